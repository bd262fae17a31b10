"""CLIP contrastive loss over the *global* batch.

Each device compares its local image features with the texts of all devices (and its local texts with all
images), as open_clip's ClipLoss(local_loss=True, gather_with_grad=True) does. The result equals the loss of the
full B_glob x B_glob logit matrix, but each device only materialises a (b_local x B_glob) block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from unitok_jax.parallel.sharding import BATCH_AXES


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def clip_loss_reference(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Single-device definition: ½[CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)], y = arange(B). Inputs are l2-normalised."""
    img = image_features.astype(jnp.float32)
    txt = text_features.astype(jnp.float32)
    logits = logit_scale.astype(jnp.float32) * jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST)
    labels = jnp.arange(img.shape[0])
    return 0.5 * (jnp.mean(_cross_entropy(logits, labels)) + jnp.mean(_cross_entropy(logits.T, labels)))


def clip_loss(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, mesh: Mesh | None = None
) -> jax.Array:
    """Global-batch CLIP loss; `mesh` shards the batch over (data, fsdp). Without a mesh: the reference."""
    if mesh is None or mesh.shape["data"] * mesh.shape["fsdp"] == 1:
        return clip_loss_reference(image_features, text_features, logit_scale)
    num_shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def local_loss(img, txt, scale):
        img = img.astype(jnp.float32)
        txt = txt.astype(jnp.float32)
        all_img = jax.lax.all_gather(img, BATCH_AXES, tiled=True)  # gather_with_grad: transposes to psum_scatter
        all_txt = jax.lax.all_gather(txt, BATCH_AXES, tiled=True)
        b_local = img.shape[0]
        labels = jax.lax.axis_index(BATCH_AXES) * b_local + jnp.arange(b_local)
        hi = jax.lax.Precision.HIGHEST
        logits_img = scale * jnp.matmul(img, all_txt.T, precision=hi)
        logits_txt = scale * jnp.matmul(txt, all_img.T, precision=hi)
        local_sum = 0.5 * (jnp.sum(_cross_entropy(logits_img, labels)) + jnp.sum(_cross_entropy(logits_txt, labels)))
        return jax.lax.psum(local_sum, BATCH_AXES) / (b_local * num_shards)

    batch_spec = P(BATCH_AXES)
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(batch_spec, batch_spec, P()), out_specs=P())(
        image_features, text_features, jnp.asarray(logit_scale, jnp.float32)
    )

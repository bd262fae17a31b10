"""The global-batch CLIP loss computed sharded (shard_map over 8 devices) equals the single-device definition."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from unitok_jax.losses.contrastive import clip_loss, clip_loss_reference
from unitok_jax.parallel.sharding import create_mesh


def _features(key, batch, dim):
    x = jax.random.normal(key, (batch, dim))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_reference_matches_numpy_definition():
    img = _features(jax.random.key(0), 6, 8)
    txt = _features(jax.random.key(1), 6, 8)
    scale = jnp.float32(10.0)
    logits = np.asarray(scale * img @ txt.T, np.float64)

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(lg).sum(axis=1)) - np.diag(lg))

    expected = 0.5 * (ce(logits) + ce(logits.T))
    np.testing.assert_allclose(float(clip_loss_reference(img, txt, scale)), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "mesh_shape", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=2, tensor=2)]
)
def test_sharded_equals_reference_value_and_gradients(mesh_shape):
    mesh = create_mesh(mesh_shape)
    batch = 16
    img = _features(jax.random.key(2), batch, 12)
    txt = _features(jax.random.key(3), batch, 12)
    scale = jnp.float32(14.3)
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    img_s, txt_s = jax.device_put(img, sh), jax.device_put(txt, sh)

    sharded = jax.jit(jax.value_and_grad(lambda i, t, s: clip_loss(i, t, s, mesh), argnums=(0, 1, 2)))
    reference = jax.jit(jax.value_and_grad(clip_loss_reference, argnums=(0, 1, 2)))
    (v_s, g_s), (v_r, g_r) = sharded(img_s, txt_s, scale), reference(img, txt, scale)
    np.testing.assert_allclose(float(v_s), float(v_r), rtol=1e-6)
    for a, b in zip(g_s, g_r):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_perfectly_aligned_features_give_low_loss():
    feats = jnp.eye(8)
    assert float(clip_loss_reference(feats, feats, jnp.float32(100.0))) < 1e-6

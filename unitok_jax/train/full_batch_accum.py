"""Full-batch gradient accumulation (`grad_accum_steps = k`, `grad_accum_mode = 'full_batch'`, the default).

The gradient of the whole batch in the activation memory of one micro-batch — exactly, including the two terms
that couple the rows of a batch: the CLIP loss (every image against every caption of the global batch) and the
GAN's adaptive weight (a ratio of full-batch gradient norms). As in GradCache (Gao et al., 2021), two passes:

  1. Forward only, micro-batch by micro-batch: the CLIP features and, with the adaptive GAN weight, each
     micro-batch's share of ∇_W nll and ∇_W gan at the last decoder conv (`step.adaptive_kernel_grads`).
  2. On the whole batch: the CLIP loss and its gradient w.r.t. the features and the logit scale (a few MB), and
     the adaptive weight from the summed kernel gradients.
  3. Forward + backward, micro-batch by micro-batch: its per-example losses plus the linear surrogate
     ⟨∂CLIP/∂features, features⟩ — whose parameter gradient is exactly that micro-batch's share of the full-batch
     CLIP gradient — with the adaptive weight from step 2; gradients summed in the scan carry.

The optimizer and the discriminator (on the whole batch's reconstructions) then update once through
`step.apply_gradients`, as `step.train_step` does, so a step equals the un-accumulated one up to float rounding
(tests/test_grad_accum.py). Cost: pass 1 is an extra forward — of the encoder and text tower when only CLIP needs
it (UniTok.clip_features; ≈ +9 % of the paper model's FLOPs per image), of the whole tokenizer once the adaptive GAN
weight does (≈ +29 %); it is skipped when neither is on. Random draws (drop-path, DiffAug of the generator's GAN term, the
discriminator's crop) are per micro-batch, identical in both passes; the discriminator update keeps the step's keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from unitok_jax.losses import adversarial, contrastive
from unitok_jax.parallel.sharding import BATCH_AXES
from unitok_jax.train import step as step_lib
from unitok_jax.train.grad_accum import split_micro_batches
from unitok_jax.train.state import TrainState


def merge_micro_batches(tree: Any, mesh) -> Any:
    """Inverse of `split_micro_batches`: (k, B/k, ...) → (B, ...) in the original row order."""

    def merge(y):
        x = jnp.swapaxes(y, 0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
        return x

    return jax.tree.map(merge, tree)


def _micro_batch_keys(keys: dict, k: int) -> dict:
    """Per micro-batch i: fold_in(key, i) of every step key, stacked along a leading axis of size k."""
    index = jnp.arange(k, dtype=jnp.uint32)
    return {name: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index) for name, key in keys.items()}


def full_batch_accumulated_train_step(
    state: TrainState,
    frozen,
    batch,
    *,
    ctx: step_lib.StepContext,
    gan_active: bool,
    num_micro_batches: int,
    param_shardings=None,
    unroll: bool = False,
):
    k = int(num_micro_batches)
    unroll = k if unroll else 1  # lax.scan's unroll factor (trainer._grad_accum_unroll)
    w = ctx.weights
    keys = step_lib.step_keys(state)
    micro = split_micro_batches(batch, k, ctx.mesh)
    micro_keys = _micro_batch_keys(keys, k)
    want_clip = bool(w.clip) and ctx.model_takes_text and "text" in batch
    want_adaptive = gan_active and w.adaptive_gan_weight

    # Pass 1 (forward only): what the whole-batch terms need.
    clip_value, clip_cotangents, adaptive = None, None, None
    if want_clip or want_adaptive:

        def first_pass(_, xs):
            chunk, chunk_keys = xs
            if not want_adaptive:  # CLIP alone: encoder + text tower, no decoder
                return None, {"clip": step_lib.clip_forward(state.params, frozen, chunk, chunk_keys, ctx)}
            model, images, frozen_view, rec, aux = step_lib.model_forward(state.params, frozen, chunk, chunk_keys, ctx)
            out = {
                "kernel_grads": step_lib.adaptive_kernel_grads(
                    model,
                    aux,
                    rec,
                    step_lib.reconstruction_nll(ctx, frozen_view, images),
                    step_lib.generator_adversarial(ctx, state, frozen_view, chunk_keys),
                )
            }
            if want_clip:
                out["clip"] = model.clip_pair(aux)
            return None, out

        _, first = jax.lax.scan(first_pass, None, (micro, micro_keys), unroll=unroll)

        if want_clip:
            image_features, text_features, logit_scale = first["clip"]

            def weighted_clip(img, txt, scale):
                return w.clip * contrastive.clip_loss(img, txt, scale, ctx.mesh)

            clip_value, (g_img, g_txt, g_scale) = jax.value_and_grad(weighted_clip, argnums=(0, 1, 2))(
                merge_micro_batches(image_features, ctx.mesh),
                merge_micro_batches(text_features, ctx.mesh),
                logit_scale[0],
            )
            # The summed micro-batch gradients are divided by k below, hence the factor k on the per-row cotangents;
            # the logit scale is the same parameter in every micro-batch, so each carries g_scale (k·g_scale/k).
            clip_cotangents = (
                k * split_micro_batches(g_img, k, ctx.mesh),
                k * split_micro_batches(g_txt, k, ctx.mesh),
                jnp.broadcast_to(g_scale, (k,)),
            )
        if want_adaptive:
            g_nll, g_gan = (jnp.mean(g, axis=0) for g in first["kernel_grads"])
            adaptive = adversarial.adaptive_weight(g_nll, g_gan, w.adaptive_clamp)

    # Pass 2 (forward + backward): per-example losses + the surrogate, gradients summed.
    def constrain(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def second_pass(grad_sum, xs):
        chunk, chunk_keys, cotangents = xs
        given = step_lib.FullBatchTerms(clip_cotangents=cotangents, adaptive_weight=adaptive)
        (_, (metrics, rec)), grads = jax.value_and_grad(step_lib.generator_loss, has_aux=True)(
            state.params, state, frozen, chunk, chunk_keys, ctx, gan_active, given
        )
        return constrain(jax.tree.map(jnp.add, grad_sum, grads)), (metrics, rec)

    grad_sum, (metrics, recs) = jax.lax.scan(
        second_pass,
        constrain(jax.tree.map(jnp.zeros_like, state.params)),
        (micro, micro_keys, clip_cotangents),
        unroll=unroll,
    )
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    metrics = {name: jnp.mean(value.astype(jnp.float32)) for name, value in metrics.items()}
    loss = metrics["train/loss/total"]
    if clip_value is not None:
        loss = loss + clip_value
        metrics["train/loss/clip"] = clip_value / w.clip
        metrics["train/logit_scale"] = first["clip"][2][0]
        metrics["train/loss/total"] = loss
    return step_lib.apply_gradients(
        state,
        frozen,
        batch,
        keys,
        ctx=ctx,
        gan_active=gan_active,
        loss=loss,
        grads=grads,
        metrics=metrics,
        rec=merge_micro_batches(recs, ctx.mesh),
    )

"""Micro-batch gradient accumulation (`grad_accum_steps = k`, `grad_accum_mode = 'micro_batch'`): one optimizer
step from k independent micro-batches of the global batch. The default mode, 'full_batch'
(train.full_batch_accum), is exact for CLIP and the adaptive GAN weight at the cost of one extra forward; this
one is cheaper and changes those two terms as described below. The batch splitting and config checks here serve both.

The global batch is split into k micro-batches (strided rows, so each device keeps its own rows and nothing moves);
`step.train_step` runs on each inside a `lax.scan`, unchanged, but with "capture" optimizers whose update returns
zeros and whose state is a running sum of the gradients. The summed generator and discriminator gradients are then
averaged and applied once with the real optimizers (clipping, AdamW, logit-scale clamp), exactly as train_step would
apply a full-batch gradient. Peak activation memory is that of one micro-batch.

Semantics to know:
  * Means over the batch (L1, L2, LPIPS, VQ, GAN) average exactly; the CLIP loss does not: each micro-batch is
    contrasted only against its own B/k captions, i.e. fewer negatives than the full-batch loss (as in any
    accumulated contrastive training), and the GAN's adaptive weight is a ratio of micro-batch gradient norms.
    Codebook usage metrics are per micro-batch, averaged.
  * A micro-batch with non-finite loss/gradients is left out of the sum (its update would have been dropped by
    train_step too); the step counts as non-finite in the health counters when any micro-batch was, and nothing is
    applied when all were.
  * Per-micro-batch RNG keys are fold_in(rng, step·k + i); the GAN ramp is evaluated per micro-step on the same
    scale, so it matches the un-accumulated schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unitok_jax.parallel.sharding import BATCH_AXES
from unitok_jax.train import step as step_lib
from unitok_jax.train.state import TrainState


class _Sum(NamedTuple):
    total: Any


def _capture() -> optax.GradientTransformation:
    """An 'optimizer' that applies nothing and keeps the sum of the gradients it was given."""

    def init(params):
        return _Sum(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        return jax.tree.map(jnp.zeros_like, grads), _Sum(jax.tree.map(jnp.add, state.total, grads))

    return optax.GradientTransformation(init, update)


def split_micro_batches(batch: dict, k: int, mesh) -> dict:
    """(B, ...) → (k, B/k, ...) with micro-batch i = rows i, i+k, i+2k, ... (device-local for contiguous shards)."""

    def split(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
        if mesh is not None:
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))
        return y

    return jax.tree.map(split, batch)


def accumulated_train_step(
    state: TrainState,
    frozen,
    batch,
    *,
    ctx: step_lib.StepContext,
    gan_active: bool,
    num_micro_batches: int,
    param_shardings=None,
    disc_param_shardings=None,
    unroll: bool = False,
):
    k = int(num_micro_batches)
    capture = _capture()
    micro_ctx = dataclasses.replace(
        ctx,
        tx=capture,
        disc_tx=capture if ctx.disc_tx is not None else None,
        gan_start_step=ctx.gan_start_step * k,
        gan_ramp_steps=ctx.gan_ramp_steps * k,
    )

    def constrain(tree, shardings):
        return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

    zero_g = _Sum(constrain(jax.tree.map(jnp.zeros_like, state.params), param_shardings))
    zero_d = _Sum(constrain(jax.tree.map(jnp.zeros_like, state.disc_params), disc_param_shardings))
    base = state.replace(
        opt_state=zero_g,
        disc_opt_state=zero_d,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )

    def body(carry, xs):
        i, micro = xs
        micro_state = carry.replace(step=state.step * k + i)
        new, metrics = step_lib.train_step(micro_state, frozen, micro, ctx=micro_ctx, gan_active=gan_active)
        carry = carry.replace(
            opt_state=new.opt_state, disc_opt_state=new.disc_opt_state, nonfinite_steps=new.nonfinite_steps
        )
        return carry, metrics

    micro_batches = split_micro_batches(batch, k, ctx.mesh)
    carry, metrics = jax.lax.scan(
        body, base, (jnp.arange(k, dtype=jnp.int32), micro_batches), unroll=k if unroll else 1
    )  # unroll: trainer._grad_accum_unroll
    bad = carry.nonfinite_steps  # micro-batches left out
    good = jnp.maximum(k - bad, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / good, carry.opt_state.total)
    updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
    params = step_lib._clamp_logit_scale(optax.apply_updates(state.params, updates), ctx.logit_scale_max)
    apply = bad < k
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if gan_active:
        d_grads = jax.tree.map(lambda g: g / good, carry.disc_opt_state.total)
        d_updates, new_d_opt = ctx.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        disc_params = step_lib._select(apply, optax.apply_updates(state.disc_params, d_updates), disc_params)
        disc_opt_state = step_lib._select(apply, new_d_opt, disc_opt_state)

    all_finite = bad == 0
    new_state = state.replace(
        step=state.step + 1,
        params=step_lib._select(apply, params, state.params),
        opt_state=step_lib._select(apply, opt_state, state.opt_state),
        disc_params=disc_params,
        disc_opt_state=disc_opt_state,
        nonfinite_steps=state.nonfinite_steps + (~all_finite).astype(jnp.int32),
        consecutive_nonfinite=jnp.where(all_finite, 0, state.consecutive_nonfinite + 1),
    )
    out = {name: jnp.mean(value.astype(jnp.float32)) for name, value in metrics.items()}
    out.update(
        {
            "train/grad_norm/generator": optax.global_norm(grads),
            "train/nonfinite_steps": new_state.nonfinite_steps,
            "train/consecutive_nonfinite": new_state.consecutive_nonfinite,
            "train/step_was_finite": all_finite.astype(jnp.float32),
            "train/micro_batches_skipped": bad.astype(jnp.float32),
        }
    )
    if gan_active:
        out["train/grad_norm/disc"] = optax.global_norm(d_grads)
    return new_state, out


MODES = ("full_batch", "micro_batch")


def check_config(
    grad_accum_steps: int, global_batch_size: int, data_parallel_size: int, mode: str = "full_batch"
) -> None:
    from unitok_jax.config_lib import ConfigError

    if mode not in MODES:
        raise ConfigError("grad_accum_mode", f"unknown mode {mode!r}", f"use one of {MODES}")
    k = int(grad_accum_steps)
    if k < 1:
        raise ConfigError("grad_accum_steps", f"must be >= 1, got {k}", "use 1 to disable accumulation")
    if global_batch_size % (k * data_parallel_size):
        raise ConfigError(
            "grad_accum_steps",
            f"global_batch_size={global_batch_size} is not divisible by grad_accum_steps*data-parallel size = "
            f"{k}*{data_parallel_size}",
            "every micro-batch must split evenly over the devices",
        )

"""The training state: generator + discriminator params and optimizer states, step, RNG and health counters.

Params are `nnx.State` trees of trainable `nnx.Param`s; frozen weights (LPIPS, the DINOv2 backbone) and any
non-Param model state travel separately as `frozen` so they are never optimised or checkpointed twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of steps applied (or skipped as non-finite)
    params: Any  # generator (tokenizer + text tower) nnx.State
    opt_state: Any
    disc_params: Any  # trainable discriminator nnx.State ({} when there is no discriminator)
    disc_opt_state: Any
    rng: jax.Array  # raw uint32[2] key data; per-step keys are fold_in(rng, step)
    nonfinite_steps: jax.Array  # int32: total steps whose update was dropped because of NaN/Inf
    consecutive_nonfinite: jax.Array  # int32: current run of such steps (the trainer stops after K)

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def initial_counters() -> dict[str, jax.Array]:
    return dict(
        step=jnp.zeros((), jnp.int32),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )

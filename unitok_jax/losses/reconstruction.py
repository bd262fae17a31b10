"""Pixel reconstruction losses (UniTok: 0.2·L1 + 1.0·L2 [+ LPIPS]), computed in float32 over all elements."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))


def l2_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))

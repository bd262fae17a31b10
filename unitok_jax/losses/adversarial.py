"""Hinge GAN losses, UniTok's adaptive generator weight, the delayed-start ramp and balanced consistency (bCR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """mean relu(1 − D(x)) + mean relu(1 + D(x̂))."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return real + fake


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """UniTok's 'hinge generator' loss: −mean D(x̂) (linear, no relu)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def consistency_loss(logits_strong: jax.Array, logits_anchor: jax.Array) -> jax.Array:
    """bCR term: MSE between D on a strongly augmented view and D on the normal view (anchor not detached)."""
    return jnp.mean(jnp.square(logits_strong.astype(jnp.float32) - logits_anchor.astype(jnp.float32)))


def adaptive_weight(grad_nll: jax.Array, grad_gan: jax.Array, clamp: tuple[float, float] = (0.015, 1e4)) -> jax.Array:
    """‖∇_W L_nll‖ / (‖∇_W L_gan‖ + 1e-6) at the last decoder layer W, clamped; no gradient flows through it."""
    ratio = jnp.linalg.norm(grad_nll.astype(jnp.float32)) / (jnp.linalg.norm(grad_gan.astype(jnp.float32)) + 1e-6)
    return jax.lax.stop_gradient(jnp.clip(ratio, clamp[0], clamp[1]))


def gan_ramp(step: jax.Array, start_step: int, ramp_steps: int) -> jax.Array:
    """0 before `start_step`, then linear to 1 over `ramp_steps` (official: min(1, (it − start)/warm)).
    With `ramp_steps == 0` the weight jumps to 1 at `start_step` (TokenFlow's disc_start)."""
    if ramp_steps <= 0:
        return (step >= start_step).astype(jnp.float32)
    progress = (step.astype(jnp.float32) - start_step) / ramp_steps
    return jnp.clip(progress, 0.0, 1.0)


def conv_kernel_gradient(
    conv_input: jax.Array, kernel: jax.Array, output_cotangent: jax.Array, *, strides, padding, groups: int = 1
) -> jax.Array:
    """∂L/∂W of a conv layer given its input and ∂L/∂output — the gradient at the last decoder layer
    without a second backward pass through the whole decoder."""

    def conv(k):
        return jax.lax.conv_general_dilated(
            conv_input.astype(jnp.float32),
            k.astype(jnp.float32),
            window_strides=strides,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST,
        )

    _, vjp = jax.vjp(conv, kernel)
    return vjp(output_cotangent.astype(jnp.float32))[0]

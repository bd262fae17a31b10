"""DiffAugment for the GAN discriminator (UniTok's `utils/diffaug.py`, from StyleGAN-T), as pure jit-able functions.

`diff_augment(images, key, ...)` applies, in this order:
  1. optional Gaussian blur (warm-up): separable kernel exp2(-(t/sigma)^2) over t in [-floor(3 sigma), floor(3 sigma)],
     normalised to sum 1, reflect padding; skipped when floor(3 sigma) < 1;
  2. integer translation: per sample dy, dx = floor(U * (2 d + 1)) - d with d = round(ratio * size), zero fill;
  3. colour: brightness x + (U - 0.5); saturation (x - mean_c) * 2U + mean_c; contrast (x - mean_chw) * (U + 0.5) + mean_chw;
  4. cutout: a square of side round(ratio * size) centred at a random pixel (clipped at the border) is zeroed.
Random numbers are drawn per sample from `key` (the same key gives the same augmentation); the official code flips
an on/off coin per op with probability `prob` = 1, so every op is always on here and the switches are static.

It does not clip: colour jitter can leave [-1, 1] (as in the reference). Layout NHWC, computed in float32.
`blur_sigma_schedule(step, warmup_steps, image_size)` gives the warm-up sigma = sqrt(H / 2) * max(0, 1 - step / (2 warmup)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def blur_sigma_schedule(step, warmup_steps, image_size: int):
    """sqrt(image_size / 2) * fade, fade going linearly 1 -> 0 over 2 * warmup_steps (0 when warmup_steps <= 0).

    `step` counts from the start of the GAN phase. Python numbers in -> Python float out; traced arrays -> f32 scalar.
    """
    sigma0 = math.sqrt(image_size * 0.5)
    if isinstance(step, (int, float)) and isinstance(warmup_steps, (int, float)):
        if warmup_steps <= 0:
            return 0.0
        return sigma0 * min(max(1.0 - step / (2.0 * warmup_steps), 0.0), 1.0)
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.asarray(warmup_steps, jnp.float32)
    fade = jnp.clip(1.0 - step / (2.0 * jnp.maximum(warm, 1e-30)), 0.0, 1.0)
    return jnp.where(warm > 0, sigma0 * fade, 0.0)


def _conv_axis(x: jax.Array, kernel: jax.Array, radius: int, axis: int) -> jax.Array:
    """Reflect-pad `axis` (1 = H or 2 = W of NHWC) by `radius`, then a depthwise correlation with the 1-D `kernel`."""
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="reflect")
    c = x.shape[-1]
    shape = (2 * radius + 1, 1) if axis == 1 else (1, 2 * radius + 1)
    k = jnp.broadcast_to(kernel.reshape(shape + (1, 1)), shape + (1, c))
    return jax.lax.conv_general_dilated(
        xp,
        k,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def gaussian_blur(x: jax.Array, sigma, *, max_sigma: float | None = None) -> jax.Array:
    """StyleGAN-T warm-up blur on NHWC `x`; `sigma` may be traced (then the kernel support is sized by `max_sigma`).

    The taps beyond floor(3 sigma) get weight 0, which equals the reference's shorter kernel because reflect padding
    maps the used taps identically for any padding width.
    """
    h, w = x.shape[1], x.shape[2]
    if isinstance(sigma, (int, float)):
        radius = int(math.floor(3.0 * sigma))
        if radius < 1:
            return x
    else:
        if max_sigma is None:
            max_sigma = math.sqrt(h * 0.5)
        radius = int(math.floor(3.0 * max_sigma))
        if radius < 1:
            return x
    if radius >= min(h, w):
        raise ValueError(f"blur radius {radius} needs images larger than {h}x{w} for reflect padding")
    sigma = jnp.asarray(sigma, jnp.float32)
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    actual = jnp.floor(3.0 * sigma)
    safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
    kernel = jnp.where(jnp.abs(t) <= actual, jnp.exp2(-jnp.square(t / safe_sigma)), 0.0)
    kernel = kernel / jnp.sum(kernel)
    delta = (t == 0).astype(jnp.float32)
    kernel = jnp.where(actual >= 1, kernel, delta)  # floor(3 sigma) < 1: no blur, like the reference
    x = _conv_axis(x, kernel, radius, axis=1)
    return _conv_axis(x, kernel, radius, axis=2)


def _shift_axis(x: jax.Array, shift: jax.Array, axis: int) -> jax.Array:
    """out[b, ..., i, ...] = x[b, ..., i + shift[b], ...] along `axis`, zero where i + shift falls outside."""
    n = x.shape[axis]
    idx = jnp.arange(n)[None, :] + shift[:, None]  # [b, n]
    valid = (idx >= 0) & (idx < n)
    idx = jnp.clip(idx, 0, n - 1)
    gathered = jax.vmap(lambda xi, ii: jnp.take(xi, ii, axis=axis - 1))(x, idx)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = n
    return jnp.where(valid.reshape(shape), gathered, jnp.zeros((), x.dtype))


def translate(x: jax.Array, u_h: jax.Array, u_w: jax.Array, ratio: float) -> jax.Array:
    """Integer translation by floor(u * (2 d + 1)) - d pixels per sample (u in [0, 1)), zero-filled borders."""
    h, w = x.shape[1], x.shape[2]
    dh, dw = round(h * ratio), round(w * ratio)
    th = jnp.floor(u_h * (2 * dh + 1)).astype(jnp.int32) - dh
    tw = jnp.floor(u_w * (2 * dw + 1)).astype(jnp.int32) - dw
    return _shift_axis(_shift_axis(x, th, 1), tw, 2)


def color_jitter(x: jax.Array, u_bright: jax.Array, u_sat: jax.Array, u_con: jax.Array) -> jax.Array:
    """Brightness, saturation and contrast jitter with per-sample uniforms in [0, 1)."""
    col = lambda u: u.reshape(-1, 1, 1, 1)  # noqa: E731
    x = x + (col(u_bright) - 0.5)
    mean_c = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean_c) * (col(u_sat) * 2.0) + mean_c
    mean_all = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean_all) * (col(u_con) + 0.5) + mean_all


def cutout_mask(batch: int, h: int, w: int, u_h: jax.Array, u_w: jax.Array, ratio: float) -> jax.Array:
    """[b, h, w] float mask: 0 inside a square of side round(ratio * size) at a random centre, 1 elsewhere."""

    def axis_mask(n, u):
        size = round(n * ratio)
        offset = jnp.floor(u * (n + (1 - size % 2))).astype(jnp.int32)
        lo = jnp.clip(offset - size // 2, 0, n - 1)
        hi = jnp.clip(offset - size // 2 + size - 1, 0, n - 1)
        i = jnp.arange(n)[None, :]
        inside = (i >= lo[:, None]) & (i <= hi[:, None])
        return inside & (size > 0)

    inside = axis_mask(h, u_h)[:, :, None] & axis_mask(w, u_w)[:, None, :]
    return 1.0 - inside.astype(jnp.float32)


def diff_augment(
    images: jax.Array,
    key: jax.Array,
    *,
    translation: float = 0.125,
    color: bool = True,
    cutout: float = 0.2,
    blur_sigma=0.0,
    max_blur_sigma: float | None = None,
) -> jax.Array:
    """Augment NHWC images (any range; UniTok feeds [-1, 1]) with per-sample random parameters drawn from `key`.

    Args:
      translation: max shift as a fraction of the size (0 disables).
      color: brightness/saturation/contrast jitter on/off.
      cutout: side of the zeroed square as a fraction of the size (0 disables).
      blur_sigma: Gaussian warm-up blur sigma (Python number or traced scalar; <= 1/3 means no blur).
      max_blur_sigma: bound on a traced `blur_sigma` that sizes the kernel (default sqrt(H / 2), the schedule's max).
    """
    x = images.astype(jnp.float32)
    b, h, w, _ = x.shape
    if not (isinstance(blur_sigma, (int, float)) and blur_sigma <= 0):
        x = gaussian_blur(x, blur_sigma, max_sigma=max_blur_sigma)
    u = jax.random.uniform(key, (7, b), jnp.float32)
    if translation > 0:
        x = translate(x, u[0], u[1], translation)
    if color:
        x = color_jitter(x, u[2], u[3], u[4])
    if cutout > 0:
        x = x * cutout_mask(b, h, w, u[5], u[6], cutout)[..., None]
    return x

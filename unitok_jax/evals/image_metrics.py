"""Per-image reconstruction metrics on NHWC images in [0, 1]: PSNR and SSIM (Wang et al. 2004). All jit-able.

SSIM follows scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1.0, channel_axis=-1)`, which is the reference MATLAB `ssim_index`: an 11x11 Gaussian window
(sigma 1.5, truncated at 3.5 sigma = radius 5, normalised), K1 = 0.01, K2 = 0.03, the SSIM map evaluated only
where the window fits ('valid' — skimage filters with reflect padding and then crops 5 pixels per border, which
gives the same numbers), averaged per channel and then over channels.

Data range: images in [0, 1] have data range 1.0. TokenFlow's and LlamaGen's evaluation scripts pass
`data_range=2.0` on [0, 1] images, which makes C1/C2 four times too large and inflates SSIM; pass
`data_range=2.0` here only to reproduce their numbers deliberately.
Not here: LPIPS (models/lpips) and FID (evals/fid).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def to_unit_range(x: jax.Array) -> jax.Array:
    """Model outputs in [-1, 1] -> [0, 1], clipped (the tokenizers' decoders have no tanh)."""
    return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def quantize_uint8(x: jax.Array) -> jax.Array:
    """[0, 1] -> nearest of the 256 uint8 levels, back in [0, 1] (what saving a PNG and reloading it does)."""
    return jnp.round(jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0) * 255.0) / 255.0


def psnr(x: jax.Array, y: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio per image: [b, h, w, c] x2 -> [b] in dB (inf for identical images).

    Computed from the per-image MSE over all pixels and channels (skimage `peak_signal_noise_ratio`).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps exp(-t^2 / 2 sigma^2), t = -(size//2)..size//2 (fspecial / scipy.ndimage)."""
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable depthwise 'valid' filtering of NHWC maps with the same 1-D taps along H and W."""
    c = x.shape[-1]
    k = len(taps)
    kernel_h = jnp.tile(jnp.asarray(taps).reshape(k, 1, 1, 1), (1, 1, 1, c))  # HWIO, depthwise
    kernel_w = jnp.tile(jnp.asarray(taps).reshape(1, k, 1, 1), (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    for kernel in (kernel_h, kernel_w):
        x = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=_HIGHEST
        )
    return x


def ssim_map(
    x: jax.Array,
    y: jax.Array,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Local SSIM map [b, h - win + 1, w - win + 1, c] (population covariances, i.e. no n/(n-1) correction)."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two NHWC images of equal shape, got {x.shape} and {y.shape}")
    if min(x.shape[1], x.shape[2]) < win_size:
        raise ValueError(f"images of size {x.shape[1:3]} are smaller than the {win_size}x{win_size} SSIM window")
    c = x.shape[-1]
    taps = gaussian_window_1d(win_size, sigma)
    # One depthwise pass over the five moments: E[x], E[y], E[x^2], E[y^2], E[xy].
    moments = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    ux, uy, uxx, uyy, uxy = (moments[..., i * c : (i + 1) * c] for i in range(5))
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim(x: jax.Array, y: jax.Array, *, data_range: float = 1.0, **kwargs) -> jax.Array:
    """Mean SSIM per image: NHWC images -> [b] (mean over the valid map per channel, then over channels)."""
    return jnp.mean(ssim_map(x, y, data_range=data_range, **kwargs), axis=(1, 2, 3))


def reconstruction_metrics(original: jax.Array, reconstructed: jax.Array, *, from_signed: bool = True) -> dict:
    """{'psnr': [b], 'ssim': [b]} for a batch; `from_signed` maps [-1, 1] model space to [0, 1] first (clipped)."""
    if from_signed:
        original, reconstructed = to_unit_range(original), to_unit_range(reconstructed)
    return {"psnr": psnr(original, reconstructed), "ssim": ssim(original, reconstructed)}


def finite_mean(values) -> float:
    """Mean of a 1-D array of per-image values ignoring +inf (identical pairs give PSNR = inf)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.inf

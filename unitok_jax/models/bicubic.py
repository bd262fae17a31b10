"""PyTorch-exact resampling for TokenFlow: bicubic `F.interpolate` and `mode='area'` (adaptive average pooling).

Not `jax.image.resize`: that uses the Keys kernel with a = -0.5 and antialiases when down-sampling, while PyTorch's
bicubic uses a = -0.75, half-pixel centres (align_corners=False), clamped border taps and never antialiases. Both
resamplers here are separable linear maps, so they are built once per static shape as small [out, in] matrices (numpy,
float64, cast to float32) and applied with two einsums at HIGHEST precision. Layout is NHWC (spatial axes 1 and 2).

Two ways to drive bicubic, because PyTorch maps coordinates differently for them:
- by size:          src = (i + 0.5) * in / out - 0.5
- by scale factor:  out = floor(in * sf), src = (i + 0.5) / sf - 0.5   (TokenFlow's DINO-style positional-table
                    interpolation uses sf = (g + 0.1) / g0, which is *not* the same as size=g).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # PyTorch's cubic convolution coefficient.
_HI = jax.lax.Precision.HIGHEST


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four Keys-kernel weights for taps at offsets -1, 0, 1, 2 (PyTorch get_cubic_upsample_coefficients)."""
    a = _A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] matrix of PyTorch bicubic (align_corners=False) along one axis.

    With `scale_factor` the source coordinate uses 1/scale_factor (PyTorch's behaviour when the caller passes
    scale_factor and recompute_scale_factor is not set); otherwise in/out.
    """
    ratio = (1.0 / scale_factor) if (scale_factor is not None and scale_factor > 0) else in_size / out_size
    i = np.arange(out_size, dtype=np.float64)
    src = (i + 0.5) * ratio - 0.5  # cubic: no clamping of negative source coordinates
    idx = np.floor(src)
    t = src - idx
    w = _cubic_weights(t)  # [out, 4]
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        taps = np.clip(idx.astype(np.int64) - 1 + k, 0, in_size - 1)  # clamped borders
        np.add.at(m, (np.arange(out_size), taps), w[:, k])
    return m


@functools.lru_cache(maxsize=256)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of adaptive average pooling: window [floor(i*in/out), ceil((i+1)*in/out))."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _apply_separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """y[b, o, p, c] = sum_{h, w} mh[o, h] mw[p, w] x[b, h, w, c] (NHWC), computed in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if mh.shape[0] != mh.shape[1] or not np.array_equal(mh, np.eye(mh.shape[0])):
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(mh, jnp.float32), x, precision=_HI)
    if mw.shape[0] != mw.shape[1] or not np.array_equal(mw, np.eye(mw.shape[0])):
        x = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(mw, jnp.float32), x, precision=_HI)
    return x.astype(dtype)


def _pair(v):
    return (v, v) if isinstance(v, (int, float)) else tuple(v)


def bicubic_resize(
    x: jax.Array,
    size: int | tuple[int, int] | None = None,
    *,
    scale_factor: float | tuple[float, float] | None = None,
) -> jax.Array:
    """PyTorch `F.interpolate(x, size|scale_factor, mode='bicubic', align_corners=False)` on NHWC input.

    Exactly one of `size` / `scale_factor` must be given. With `scale_factor` the output size is floor(in * sf)
    (computed in float64 like PyTorch's Python wrapper) and coordinates use 1/sf.
    """
    if (size is None) == (scale_factor is None):
        raise ValueError("bicubic_resize: give exactly one of size or scale_factor")
    h, w = x.shape[1], x.shape[2]
    if size is not None:
        oh, ow = _pair(size)
        mh, mw = bicubic_matrix(h, oh), bicubic_matrix(w, ow)
    else:
        sh, sw = (float(s) for s in _pair(scale_factor))
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
        mh, mw = bicubic_matrix(h, oh, sh), bicubic_matrix(w, ow, sw)
    return _apply_separable(x, mh, mw)


def area_resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """PyTorch `F.interpolate(x, size, mode='area')` = `adaptive_avg_pool2d` on NHWC input (overlapping windows
    for non-divisible sizes, e.g. 5 -> 2 uses rows [0, 3) and [2, 5))."""
    oh, ow = _pair(size)
    return _apply_separable(x, area_matrix(x.shape[1], oh), area_matrix(x.shape[2], ow))


def interpolate_pos_table(table: jax.Array, grid: int | tuple[int, int]) -> jax.Array:
    """DINO/BEiT/TokenFlow positional-table interpolation: [g0*g0, d] patch positions -> [gh*gw, d].

    PyTorch reference (clip/model.py, vqkd_model.py interpolate_pos_encoding): reshape to a g0 x g0 map and call
    bicubic with scale_factor = ((gh + 0.1) / g0, (gw + 0.1) / g0); the +0.1 makes floor() land on gh, gw.
    Identity when the grid already matches.
    """
    gh, gw = _pair(grid)
    n, d = table.shape
    g0 = int(round(math.sqrt(n)))
    if g0 * g0 != n:
        raise ValueError(f"positional table with {n} patch positions is not a square grid")
    if (gh, gw) == (g0, g0):
        return table
    m = table.reshape(1, g0, g0, d)
    out = bicubic_resize(m, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0))
    if out.shape[1:3] != (gh, gw):  # mirrors the assert in the official code
        raise ValueError(f"positional interpolation {g0}x{g0} -> {gh}x{gw} produced {out.shape[1:3]}")
    return out.reshape(gh * gw, d)

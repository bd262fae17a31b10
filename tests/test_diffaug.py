"""DiffAug invariants: shapes, determinism per key, translation/cutout/colour semantics, blur kernel and schedule.

There is no PyTorch fixture for DiffAug (it is random); these tests check each op against its definition
(spec §3 / StyleGAN-T diffaug) with numpy references.
"""

import math

import numpy as np
import pytest

import unitok_jax  # noqa: F401
import jax
import jax.numpy as jnp

from unitok_jax.losses import diffaug as da

# Compiled once per static configuration (eager op-by-op dispatch is slow on a shared 2-core CPU).
AUG = jax.jit(da.diff_augment, static_argnames=("translation", "color", "cutout"))


def _images(b=8, h=32, w=32, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, h, w, 3), minval=-1, maxval=1)


def _np_shift(img, dy, dx):
    """out[i, j] = img[i + dy, j + dx], zero outside."""
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    out[max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = img[
        max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


def test_shape_dtype_determinism_and_jit():
    x = _images()
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y1 = AUG(x, k1)
    y2 = AUG(x, k2)
    assert y1.shape == x.shape and y1.dtype == jnp.float32
    assert not np.allclose(np.asarray(y1), np.asarray(y2))
    np.testing.assert_array_equal(np.asarray(AUG(x, k1)), np.asarray(y1))
    # Per-sample randomness: samples of one call get different parameters.
    same = AUG(jnp.broadcast_to(x[:1], x.shape), k1, color=False, cutout=0.0)
    assert len({np.asarray(s).tobytes() for s in same}) > 1


def test_translation_is_integer_shift_with_zero_fill():
    x = np.asarray(_images(b=16, h=16, w=16))
    y = np.asarray(AUG(jnp.asarray(x), jax.random.key(3), translation=0.125, color=False, cutout=0.0))
    d = round(16 * 0.125)
    shifts = []
    for b in range(16):
        found = [
            (dy, dx)
            for dy in range(-d, d + 1)
            for dx in range(-d, d + 1)
            if np.array_equal(_np_shift(x[b], dy, dx), y[b])
        ]
        assert len(found) == 1, f"sample {b} is not a unique integer shift within +-{d}"
        shifts.append(found[0])
    assert any(s != (0, 0) for s in shifts), "translation never moved anything"
    assert len(set(shifts)) > 3


def test_translation_moves_a_dot():
    x = np.zeros((4, 32, 32, 3), np.float32)
    x[:, 16, 16, :] = 1.0
    y = np.asarray(AUG(jnp.asarray(x), jax.random.key(5), translation=0.125, color=False, cutout=0.0))
    for b in range(4):
        ys, xs = np.nonzero(y[b, :, :, 0])
        assert len(ys) == 1  # the dot survives (|shift| <= 4 < 16) and is not duplicated
        assert abs(ys[0] - 16) <= 4 and abs(xs[0] - 16) <= 4


def test_cutout_zeros_one_clipped_square():
    h = w = 40
    side = round(h * 0.2)  # 8
    x = jnp.ones((32, h, w, 3))
    y = np.asarray(AUG(x, jax.random.key(7), translation=0.0, color=False, cutout=0.2))
    full = 0
    for b in range(32):
        zero = y[b, :, :, 0] == 0
        assert np.all(y[b][zero] == 0) and np.all(y[b][~zero] == 1)
        rows, cols = np.nonzero(zero.any(axis=1))[0], np.nonzero(zero.any(axis=0))[0]
        # A contiguous rectangle ...
        assert zero.sum() == len(rows) * len(cols)
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
        assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        # ... of side `side`, clipped at the border to no less than half of it (the centre is inside the image).
        assert side // 2 <= len(rows) <= side and side // 2 <= len(cols) <= side
        full += len(rows) == side and len(cols) == side
    assert full > 16  # most squares are interior


def test_color_jitter_semantics():
    x = _images(b=16)
    y = AUG(x, jax.random.key(11), translation=0.0, color=True, cutout=0.0)
    # Saturation keeps the per-pixel channel mean and contrast keeps the image mean: only brightness moves the mean.
    shift = np.asarray(jnp.mean(y, axis=(1, 2, 3)) - jnp.mean(x, axis=(1, 2, 3)))
    assert np.all(shift >= -0.5 - 1e-5) and np.all(shift <= 0.5 + 1e-5)
    assert np.std(shift) > 0.05
    # A constant grey image is only shifted (saturation and contrast act on deviations from means).
    c = jnp.full((4, 8, 8, 3), 0.25)
    yc = np.asarray(AUG(c, jax.random.key(12), translation=0.0, color=True, cutout=0.0))
    for b in range(4):
        np.testing.assert_allclose(yc[b], yc[b, 0, 0, 0], atol=1e-6)
        assert -0.25 - 1e-6 <= yc[b, 0, 0, 0] <= 0.75 + 1e-6


def _np_blur(img, sigma):
    r = int(math.floor(3 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp2(-np.square(t / sigma))
    k /= k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return out


def test_blur_matches_numpy_reference_static_and_traced():
    x = np.asarray(_images(b=2, h=24, w=20))
    sigma = 1.7
    ref = np.stack([_np_blur(x[b], sigma) for b in range(2)])
    ours = jax.jit(lambda im: da.gaussian_blur(im, sigma))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
    traced = jax.jit(lambda im, s: da.gaussian_blur(im, s, max_sigma=3.0))(jnp.asarray(x), jnp.float32(sigma))
    np.testing.assert_allclose(np.asarray(traced), ref, atol=1e-5)
    # sigma < 1/3 => floor(3 sigma) = 0 => identity (also when traced); constant images are unchanged.
    np.testing.assert_array_equal(np.asarray(jax.jit(da.gaussian_blur)(jnp.asarray(x), jnp.float32(0.2))), x)
    np.testing.assert_allclose(np.asarray(da.gaussian_blur(jnp.full((1, 16, 16, 3), 0.3), 2.0)), 0.3, atol=1e-6)
    # Inside diff_augment the blur comes first and a traced sigma works under jit.
    aug = jax.jit(lambda im, k, s: da.diff_augment(im, k, translation=0.0, color=False, cutout=0.0, blur_sigma=s))
    np.testing.assert_allclose(np.asarray(aug(jnp.asarray(x), jax.random.key(0), jnp.float32(sigma))), ref, atol=1e-5)


def test_blur_sigma_schedule():
    h = 64
    s0 = math.sqrt(h / 2)
    assert da.blur_sigma_schedule(0, 100, h) == pytest.approx(s0)
    assert da.blur_sigma_schedule(100, 100, h) == pytest.approx(s0 / 2)
    assert da.blur_sigma_schedule(200, 100, h) == 0.0
    assert da.blur_sigma_schedule(500, 100, h) == 0.0
    assert da.blur_sigma_schedule(10, 0, h) == 0.0
    traced = jax.jit(lambda s: da.blur_sigma_schedule(s, 100, h))(jnp.int32(50))
    assert float(traced) == pytest.approx(s0 * 0.75)

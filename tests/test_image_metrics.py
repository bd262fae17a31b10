"""PSNR / SSIM: invariants, a scikit-image-equivalent scipy reference, data-range semantics, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unitok_jax  # noqa: F401
from unitok_jax.evals import image_metrics as im

ndimage = pytest.importorskip("scipy.ndimage")


def _ssim_reference(x, y, data_range=1.0):
    """skimage.metrics.structural_similarity(x, y, data_range=..., channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False) re-derived with scipy: reflect-mode Gaussian filtering
    (truncate 3.5 -> 11 taps), crop (win-1)//2 = 5 pixels per border, mean per channel, mean over channels."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch], y[..., ch]
        filt = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        ux, uy = filt(a), filt(b)
        uxx, uyy, uxy = filt(a * a), filt(b * b), filt(a * b)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        per_channel.append(s[5:-5, 5:-5].mean())
    return float(np.mean(per_channel))


def _pair(seed, shape=(3, 32, 40, 3), noise=0.1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, shape).astype(np.float32)
    # Smooth structure + noise so SSIM is far from both 0 and 1.
    x = ndimage.gaussian_filter(x, sigma=(0, 2, 2, 0)).astype(np.float32)
    y = np.clip(x + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return x, y


def test_window_matches_scipy_gaussian():
    taps = im.gaussian_window_1d(11, 1.5)
    impulse = np.zeros(31)
    impulse[15] = 1.0
    ref = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[10:21]
    np.testing.assert_allclose(taps, ref, rtol=1e-6, atol=1e-8)
    assert abs(taps.sum() - 1) < 1e-6


@pytest.mark.parametrize("seed,noise", [(0, 0.05), (1, 0.2), (2, 0.5)])
def test_ssim_matches_reference(seed, noise):
    x, y = _pair(seed, noise=noise)
    got = np.asarray(im.ssim(x, y))
    ref = np.array([_ssim_reference(x[i], y[i]) for i in range(x.shape[0])])
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_ssim_data_range_quirk():
    # TokenFlow/LlamaGen pass data_range=2 on [0,1] images: C1/C2 x4, SSIM inflated.
    x, y = _pair(3, noise=0.3)
    correct = np.asarray(im.ssim(x, y))
    quirk = np.asarray(im.ssim(x, y, data_range=2.0))
    ref_quirk = np.array([_ssim_reference(x[i], y[i], data_range=2.0) for i in range(3)])
    np.testing.assert_allclose(quirk, ref_quirk, atol=2e-5)
    assert np.all(quirk > correct)


def test_ssim_invariants():
    x, y = _pair(4)
    np.testing.assert_allclose(np.asarray(im.ssim(x, x)), 1.0, atol=1e-6)
    s_xy, s_yx = np.asarray(im.ssim(x, y)), np.asarray(im.ssim(y, x))
    np.testing.assert_allclose(s_xy, s_yx, atol=1e-6)  # symmetric
    assert np.all(s_xy < 1.0) and np.all(s_xy > -1.0)
    # A constant image vs itself: 0/0-free thanks to C1, C2.
    const = np.full((1, 16, 16, 3), 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(im.ssim(const, const)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than"):
        im.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_psnr_known_mse():
    x = np.zeros((2, 8, 8, 3), np.float32)
    y = x.copy()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    y[1, ::2] += 0.5  # half the pixels off by 0.5 -> mse 0.125 -> 9.0309 dB
    got = np.asarray(im.psnr(x, y))
    np.testing.assert_allclose(got, [20.0, 10 * np.log10(1 / 0.125)], rtol=1e-5)
    assert np.isinf(np.asarray(im.psnr(x, x))).all()
    np.testing.assert_allclose(im.finite_mean([20.0, np.inf, 10.0]), 15.0)


def test_jit_and_unit_range():
    x, y = _pair(5, shape=(2, 16, 16, 3))
    f = jax.jit(lambda a, b: im.reconstruction_metrics(a, b, from_signed=False))
    out = f(x, y)
    np.testing.assert_allclose(np.asarray(out["ssim"]), np.asarray(im.ssim(x, y)), atol=1e-6)
    signed = jnp.asarray([-1.5, -1.0, 0.0, 1.0, 2.0])
    np.testing.assert_allclose(np.asarray(im.to_unit_range(signed)), [0, 0, 0.5, 1, 1])
    q = np.asarray(im.quantize_uint8(jnp.asarray([0.0, 0.5, 1.0, 0.10])))
    np.testing.assert_allclose(q * 255, [0, 128, 255, 26])

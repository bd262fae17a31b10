"""GAN loss pieces: hinge values, ramp, and the adaptive weight's last-layer gradient shortcut."""

import numpy as np

import jax
import jax.numpy as jnp

from unitok_jax.losses import adversarial


def test_hinge_losses():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.0])
    expected = np.mean(np.maximum(0, 1 - np.array([2.0, 0.5, -1.0]))) + np.mean(
        np.maximum(0, 1 + np.array([-2.0, 0.0, 1.0]))
    )
    np.testing.assert_allclose(float(adversarial.hinge_discriminator_loss(real, fake)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(adversarial.generator_adversarial_loss(fake)), -np.mean([-2.0, 0.0, 1.0]), rtol=1e-6
    )


def test_gan_ramp_is_delayed_and_linear():
    ramp = lambda s: float(adversarial.gan_ramp(jnp.int32(s), 100, 50))  # noqa: E731
    assert ramp(0) == 0.0 and ramp(100) == 0.0
    np.testing.assert_allclose(ramp(125), 0.5)
    assert ramp(150) == 1.0 and ramp(10_000) == 1.0


def test_adaptive_weight_clamped_and_ratio():
    g1, g2 = jnp.full((3, 3), 2.0), jnp.full((3, 3), 1.0)
    np.testing.assert_allclose(float(adversarial.adaptive_weight(g1, g2)), 2.0, rtol=1e-5)
    assert float(adversarial.adaptive_weight(g1 * 1e-9, g2)) == np.float32(0.015)
    assert float(adversarial.adaptive_weight(g1, g2 * 0)) == np.float32(1e4)


def test_conv_kernel_gradient_equals_full_autodiff():
    """∂L/∂W via (conv input, ∂L/∂output) equals differentiating the whole loss w.r.t. the kernel."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, 8, 8, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 3))
    target = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    pad = ((1, 1), (1, 1))

    def forward(k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST
        )

    loss = lambda out: jnp.mean(jnp.abs(out - target)) + jnp.mean(jnp.square(out))  # noqa: E731
    full = jax.grad(lambda k: loss(forward(k)))(kernel)
    shortcut = adversarial.conv_kernel_gradient(x, kernel, jax.grad(loss)(forward(kernel)), strides=(1, 1), padding=pad)
    np.testing.assert_allclose(np.asarray(shortcut), np.asarray(full), rtol=1e-5, atol=1e-6)

"""Gradient accumulation (config.grad_accum_steps): 'full_batch' mode gives the full-batch update with CLIP and the
adaptive GAN weight on; 'micro_batch' mode keeps the per-example terms and contrasts within micro-batches; bad
configs are rejected. The generator's DiffAug is switched off where the GAN is on: it is drawn per micro-batch, so
its draws differ from the full batch's by design."""

import jax
import numpy as np
import pytest

from train_helpers import micro_config
from unitok_jax.config_lib import ConfigError
from unitok_jax.parallel import sharding as shd
from unitok_jax.train import grad_accum, trainer

pytestmark = pytest.mark.slow  # trains or compiles train steps


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, s, t = config.global_batch_size, config.data.image_size, config.data.context_length
    text = rng.integers(1, 200, (b, t)).astype(np.int32)
    text[:, -1] = 258
    return {"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32), "text": text}


def _one_step(config, batch_np, gan=False):
    components = trainer.build_components(config)
    with jax.set_mesh(components.mesh):
        state = components.init_state()
    frozen = components.init_frozen()
    batch = shd.to_global_batch(batch_np, components.mesh)
    steps = trainer.jit_train_steps(components, jax.tree.map(lambda x: x.sharding, batch))
    state, metrics = steps[gan](state, frozen, batch)
    return jax.device_get(state), jax.device_get(metrics)


def test_split_micro_batches_is_strided():
    x = np.arange(8 * 2).reshape(8, 2)
    out = np.asarray(grad_accum.split_micro_batches({"x": x}, 2, None)["x"])
    np.testing.assert_array_equal(out[0], x[0::2])
    np.testing.assert_array_equal(out[1], x[1::2])


def test_config_checks():
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        grad_accum.check_config(0, 16, 8)
    with pytest.raises(ConfigError, match="divisible"):
        grad_accum.check_config(4, 16, 8)
    with pytest.raises(ConfigError, match="grad_accum_mode"):
        grad_accum.check_config(2, 16, 8, "exact")
    grad_accum.check_config(2, 16, 8)


def test_micro_batch_loop_is_unrolled_on_cpu_unless_configured(tmp_path):
    config = micro_config(tmp_path)
    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"))
    assert trainer._grad_accum_unroll(config, mesh)  # CPU devices: XLA:CPU runs convs in loops slowly
    config.grad_accum_unroll = False  # e.g. benchmarks/aot_memory.py, which models an accelerator's scan
    assert not trainer._grad_accum_unroll(config, mesh)


def _assert_same_update(acc, full, lr):
    # Adam's first step is ~lr·sign(g): entries with a ~0 gradient (e.g. attention k-biases) may flip sign.
    loose = total = 0
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2 * lr)
        loose += int(np.sum(np.abs(a - b) > 1e-5))
        total += a.size
    assert loose / total < 0.01
    for a, b in zip(jax.tree.leaves(acc.disc_params), jax.tree.leaves(full.disc_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2 * lr)


def _gan_config(tmp_path):
    config = micro_config(tmp_path, gan=True, batch=16)
    config.loss.gan_ramp = 0.0  # full GAN weight from step 0, so the adversarial term shapes the update
    config.loss.diffaug.update(dict(translation=0.0, color=False, cutout=0.0))
    return config


@pytest.mark.slow
def test_full_batch_accumulation_equals_one_full_batch_step(tmp_path):
    """CLIP over all 16 captions and the adaptive weight from full-batch norms, in two micro-batches of 8."""
    config = _gan_config(tmp_path)
    batch = _batch(config)
    full, m_full = _one_step(config, batch, gan=True)
    config.grad_accum_steps = 2
    acc, m_acc = _one_step(config, batch, gan=True)
    assert int(acc.step) == 1 and int(acc.nonfinite_steps) == 0
    for key in (
        "train/loss/clip",
        "train/loss/l2",
        "train/loss/vq",
        "train/loss/g_adv",
        "train/gan/adaptive_weight",
        "train/loss/total",
        "train/loss/d",
        "train/logit_scale",
    ):
        np.testing.assert_allclose(m_acc[key], m_full[key], rtol=1e-5, err_msg=key)
    for key in ("train/grad_norm/generator", "train/grad_norm/disc"):
        np.testing.assert_allclose(m_acc[key], m_full[key], rtol=1e-4, err_msg=key)
    _assert_same_update(acc, full, config.optimizer.lr)


@pytest.mark.slow
def test_without_gan_full_batch_mode_is_exact_and_micro_batch_mode_contrasts_per_micro_batch(tmp_path):
    """No GAN: full-batch mode's first pass is UniTok.clip_features (no decoder); micro-batch mode keeps the
    per-example terms but contrasts each half of the batch only against its own 8 captions."""
    config = micro_config(tmp_path, gan=False, batch=16)
    batch = _batch(config)
    full, m_full = _one_step(config, batch)
    config.grad_accum_steps = 2
    acc, m_acc = _one_step(config, batch)
    for key in ("train/loss/clip", "train/loss/l2", "train/loss/vq", "train/loss/total"):
        np.testing.assert_allclose(m_acc[key], m_full[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(m_acc["train/grad_norm/generator"], m_full["train/grad_norm/generator"], rtol=1e-4)
    _assert_same_update(acc, full, config.optimizer.lr)

    config.grad_accum_mode = "micro_batch"
    micro, m_micro = _one_step(config, batch)
    assert int(micro.step) == 1 and float(m_micro["train/step_was_finite"]) == 1.0
    np.testing.assert_allclose(m_micro["train/loss/l2"], m_full["train/loss/l2"], rtol=1e-5)
    assert m_micro["train/loss/clip"] < m_full["train/loss/clip"] - 0.1  # 8 candidates instead of 16

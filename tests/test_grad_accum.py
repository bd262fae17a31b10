"""Gradient accumulation (config.grad_accum_steps): k micro-batches give the full-batch update when every loss is a
batch mean (CLIP off: its negatives differ by construction), the GAN variant runs, and bad configs are rejected."""
import jax
import numpy as np
import pytest

from train_helpers import micro_config
from unitok_jax.config_lib import ConfigError
from unitok_jax.parallel import sharding as shd
from unitok_jax.train import grad_accum, trainer


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
    grad_accum.check_config(2, 16, 8)


@pytest.mark.slow
def test_two_micro_batches_equal_one_full_batch(tmp_path):
    config = micro_config(tmp_path, gan=False, batch=16)
    config.loss.clip = 0.0
    batch = _batch(config)
    full, m_full = _one_step(config, batch)
    config.grad_accum_steps = 2
    acc, m_acc = _one_step(config, batch)
    assert int(acc.step) == 1 and int(acc.nonfinite_steps) == 0
    np.testing.assert_allclose(m_acc["train/loss/l2"], m_full["train/loss/l2"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["train/grad_norm/generator"], m_full["train/grad_norm/generator"], rtol=1e-4)
    # Adam's first step is ~lr·sign(g): entries with a ~0 gradient (e.g. attention k-biases) may flip sign.
    loose = total = 0
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2 * config.optimizer.lr)
        loose += int(np.sum(np.abs(a - b) > 1e-5))
        total += a.size
    assert loose / total < 0.01


@pytest.mark.slow
def test_accumulated_gan_step_runs(tmp_path):
    config = micro_config(tmp_path, gan=True, batch=16)
    config.grad_accum_steps = 2
    state, metrics = _one_step(config, _batch(config), gan=True)
    assert int(state.step) == 1 and float(metrics["train/step_was_finite"]) == 1.0
    for key in ("train/loss/d", "train/loss/g_adv", "train/grad_norm/disc", "train/loss/clip"):
        assert np.isfinite(metrics[key]), key

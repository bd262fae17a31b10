"""End-to-end trainer on the embedded dataset: outputs, resume from checkpoint (incl. the data iterator), errors."""

import json
import os

import numpy as np
import pytest

import jax

from train_helpers import micro_config
from unitok_jax.config_lib import ConfigError
from unitok_jax.train import trainer
from unitok_jax.train.validation import validate_config

pytestmark = pytest.mark.slow  # trains or compiles train steps


@pytest.mark.slow
def test_train_writes_outputs_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    config = micro_config(tmp_path, gan=True, steps=4)
    config.loss.gan_start = 2.0  # steps 0-1 without GAN, 2-3 with it: both compiled variants run
    full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")

    summary = trainer.train(config, full_dir)
    assert summary["final_step"] == 4 and summary["origin"] == "started from scratch"
    records = [json.loads(line) for line in open(os.path.join(full_dir, "metrics.jsonl"))]
    records = [r for r in records if "train/loss/total" in r]  # periodic-eval records share the file
    assert sorted({r["step"] for r in records}) == [1, 2, 3, 4]
    for key in (
        "train/loss/l1",
        "train/loss/l2",
        "train/loss/vq",
        "train/loss/clip",
        "train/codebook/usage",
        "perf/images_per_sec",
    ):
        assert key in records[-1], key
    assert "train/loss/g_adv" in records[-1] and "train/loss/d" in records[-1]
    assert sorted(os.listdir(os.path.join(full_dir, "images")))[-1].endswith(".png")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(full_dir, "tensorboard")))

    # Interrupted run: a preemption notice at step 2 (same config, so the same LR schedule and GAN start), then the
    # same command again → resumes at step 2 and ends identical.
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_preemption_reached", lambda step: step == 2)
        interrupted = trainer.train(config, split_dir)
    assert interrupted["final_step"] == 2
    resumed = trainer.train(config, split_dir)
    assert resumed["start_step"] == 2 and resumed["origin"].startswith("resumed")

    from unitok_jax.train.checkpointing import restore_params_only

    def final_params(directory):
        return restore_params_only(os.path.join(directory, "checkpoints", "4"), None)

    for a, b in zip(jax.tree.leaves(final_params(full_dir)), jax.tree.leaves(final_params(split_dir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Fine-tuning start: a new run whose params come from the finished one (fresh optimizer, step 0).
    config.init_from = os.path.join(full_dir, "checkpoints", "4")
    tuned_dir = str(tmp_path / "tuned")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_preemption_reached", lambda step: step == 1)
        tuned = trainer.train(config, tuned_dir)
    assert tuned["start_step"] == 0 and tuned["origin"] == f"initialised params from {config.init_from}"
    first_tuned = json.loads(open(os.path.join(tuned_dir, "metrics.jsonl")).readline())
    first_scratch = next(r for r in records if r["step"] == 1)
    assert first_tuned["train/loss/l2"] < 0.8 * first_scratch["train/loss/l2"]  # it starts from trained weights


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("global_batch_size", 12, "global_batch_size"),
        ("model_name", "vqgan", "model_name"),
        ("data.image_size", 40, "data.image_size"),
        ("discriminator.name", "stylegan", "discriminator.name"),
        ("loss.lpips", 1.0, "loss.lpips_path"),
        ("mesh.rules", "zero3", "mesh.rules"),
    ],
)
def test_config_errors_name_the_field(tmp_path, field, value, match):
    config = micro_config(tmp_path)
    config.mesh.update(dict(data=8, fsdp=1, tensor=1))
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=8, process_count=1)


def test_model_config_errors_before_compilation(tmp_path):
    config = micro_config(tmp_path)
    config.model.quant_proj.out_dim = 18  # 18 is not num_codebooks * codebook_dim
    with pytest.raises(ValueError, match="quant"):
        trainer.build_components(config)

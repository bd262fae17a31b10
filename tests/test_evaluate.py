"""Eval runner + CLI: a micro UniTok checkpoint (trainer format) gives a complete, in-range report (recon, LPIPS, codebook
usage, zero-shot vs chance, retrieval, grid; FID skipped without weights and computed with stub features); the
trainer-layout periodic hook (mesh-sharded params) reproduces the CLI numbers and writes eval/<name>/<metric>."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import ml_collections

from train_helpers import ROOT, micro_config
from unitok_jax import demo
from unitok_jax.evals import config as eval_config_lib
from unitok_jax.evals import eval_networks, runner, zeroshot_setup
from unitok_jax.load import load_tokenizer
from unitok_jax.train import checkpointing
from unitok_jax.train.periodic_evals import run_periodic_evals

pytestmark = pytest.mark.slow  # a demo checkpoint and every eval end to end (CLI, periodic hook)

NUM_EVAL = 16


def _copy(config):
    return ml_collections.ConfigDict(config.to_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    config = micro_config(tmp, gan=False, steps=2)
    config.eval = eval_config_lib.default_eval_config()
    config.eval.grid_images = 8
    workdir = str(tmp / "run")
    # A real trainer-format checkpoint (TrainState with optimizer state, config, via the trainer's Checkpointer).
    # Freshly initialised: running train steps here would cost minutes of compilation on 2 CPU cores
    # (test_trainer covers training; benchmarks/eval_tiny.sh evaluates a trained run).
    demo.create_demo_checkpoint(config, workdir, train_steps=0)
    return config, workdir


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory, fixtures_dir):
    config, workdir = trained
    config = _copy(config)
    config.eval.recon.lpips_path = str(fixtures_dir / "lpips_random.npz")  # random VGG weights: plumbing only
    model, step = load_tokenizer(workdir, config)
    assert step == 0
    out_dir = str(tmp_path_factory.mktemp("eval_out"))
    return runner.run_evals(config, model, "recon,fid,zeroshot", step=step, output_dir=out_dir)


def test_report_keys_and_ranges(report):
    r = report
    assert r["recon/num_images"] == NUM_EVAL and r["meta/step"] == 0
    assert 0.0 < r["recon/psnr"] < 100.0
    assert -1.0 <= r["recon/ssim"] <= 1.0
    assert math.isfinite(r["recon/lpips"])
    k, K = 4, 64
    assert r["recon/num_tokens"] == NUM_EVAL * 2 * 2  # 32 px / 16 = 2x2 tokens per image, per codebook
    assert 0.0 < r["recon/usage"] <= 1.0 and 0.0 < r["recon/usage_official"] <= 1.0
    assert 1.0 <= r["recon/perplexity"] <= K
    for i in range(k):
        assert 0.0 < r[f"recon/usage/cb{i}"] <= 1.0 and 1.0 <= r[f"recon/perplexity/cb{i}"] <= K
    assert os.path.exists(r["recon/grid"]) and r["recon/grid"].endswith(".png")
    assert "inception_path" in r["fid/skipped"]
    assert r["zeroshot/num_classes"] == 48 and r["zeroshot/count"] == NUM_EVAL
    assert r["zeroshot/chance"] == pytest.approx(1 / 48) and r["zeroshot/chance_top5"] == pytest.approx(5 / 48)
    assert 0.0 <= r["zeroshot/top1"] <= r["zeroshot/top5"] <= 1.0
    assert r["zeroshot/top1_over_chance"] == pytest.approx(r["zeroshot/top1"] * 48)
    for d in ("image_to_text", "text_to_image"):
        assert (
            0.0
            <= r[f"zeroshot/retrieval/{d}/R@1"]
            <= r[f"zeroshot/retrieval/{d}/R@5"]
            <= r[f"zeroshot/retrieval/{d}/R@10"]
            <= 1.0
        )
    assert all(isinstance(v, (int, float, str)) for v in r.values())
    json.dumps(r)


@pytest.mark.slow
def test_cli_writes_json_report(trained, report, tmp_path):
    _, workdir = trained
    out = tmp_path / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.evaluate",
            f"--checkpoint={workdir}",
            "--evals=recon,fid,zeroshot",
            f"--output={out}",
        ],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(out.read_text())
    assert "report written to" in proc.stdout
    assert cli["meta/step"] == 0 and cli["meta/checkpoint"].endswith(os.path.join("checkpoints", "0"))
    assert "lpips" in cli["recon/lpips_skipped"] and "inception_path" in cli["fid/skipped"]
    assert os.path.exists(cli["recon/grid"])
    for key in ("recon/psnr", "recon/ssim", "recon/usage", "recon/perplexity", "zeroshot/top1", "zeroshot/top5"):
        assert cli[key] == pytest.approx(report[key], rel=1e-4, abs=1e-5), key


def test_periodic_hook_in_trainer_layout(trained, report, tmp_path):
    """What the trainer will call: (graphdef, mesh-sharded params, model_rest) every N steps, process 0 writes."""
    from unitok_jax.train import trainer
    from unitok_jax.train.metric_writers import MetricWriter

    config, workdir = trained
    config = _copy(config)
    config.eval.every_steps = 2
    config.eval.names = "recon,zeroshot"
    config.total_steps = 3
    components = trainer.build_components(config)
    assert components.mesh.size == jax.device_count() == 8
    params = checkpointing.restore_params_only(
        workdir,
        checkpointing.abstract_with_shardings(components.abstract_state.params, components.state_shardings.params),
    )
    rest = components.init_frozen()["model_rest"]
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    graphdef = components.ctx.model_graphdef
    assert run_periodic_evals(config, 1, params, rest, graphdef, writer) is None  # not due: no work
    assert not eval_config_lib.evals_due(config, 1)
    got = run_periodic_evals(config, 2, params, rest, graphdef, writer)
    assert eval_config_lib.evals_due(config, 3)  # at_end: the last step too
    writer.close()
    assert "fid/skipped" not in got  # not requested
    for key in ("recon/psnr", "recon/ssim", "recon/usage", "zeroshot/top1"):
        assert got[key] == pytest.approx(report[key], rel=1e-4, abs=1e-5), key
    record = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert record["step"] == 2
    assert record["eval/recon/psnr"] == pytest.approx(report["recon/psnr"], rel=1e-4)
    assert "eval/zeroshot/top1" in record and "eval/seconds" in record
    assert any(n.startswith("eval_recon_step") for n in os.listdir(tmp_path / "images"))


def test_fid_with_stub_features_caches_reference_stats(trained, tmp_path, monkeypatch):
    """rFID plumbing without InceptionV3 weights: a cheap feature function; reference stats cached to .npz and
    reused (second run reads the cache)."""
    from unitok_jax.evals import fid

    config, workdir = trained
    config = _copy(config)
    config.eval.fid.reference_stats = str(tmp_path / "ref_stats.npz")
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(32 * 32 * 3, 8)).astype(np.float32)

    def features(images):
        # Row by row: a BLAS matmul's rounding can depend on the number of rows (OpenBLAS picks kernels by shape),
        # and the first run passes reconstructions and references together, the second reconstructions alone.
        flat = np.asarray(images, np.float32).reshape(len(images), -1)
        out = np.stack([row @ proj for row in flat])
        return {"pool3": out, "logits": out}

    def stub(config_, ec, files, num_batches, batch_size):
        return fid.FidEvaluator(
            None, ec.fid.reference_stats or None, feature_fn=features, feature_dim=8, is_splits=2
        ), None

    monkeypatch.setattr(eval_networks, "fid_evaluator", stub)
    model, _ = load_tokenizer(workdir, config)
    first = runner.run_evals(config, model, "fid")
    assert first["fid/rfid"] > 0 and first["fid/num_images"] == NUM_EVAL and first["fid/num_reference"] == NUM_EVAL
    assert math.isfinite(first["fid/inception_score"])
    assert os.path.exists(tmp_path / "ref_stats.npz")
    second = runner.run_evals(config, model, "fid")
    assert second["fid/rfid"] == pytest.approx(first["fid/rfid"], rel=1e-9)


def test_missing_weights_and_unknown_evals_say_why(trained, tmp_path):
    config, _ = trained
    config = _copy(config)
    config.eval.fid.inception_path = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown eval"):
        eval_config_lib.parse_names("recon,bleu")
    ev, why = eval_networks.fid_evaluator(config, eval_config_lib.eval_config(config), [], 0, 16)
    assert ev is None and "do not exist" in why


def test_eval_config_tolerates_missing_and_partial_fields(trained):
    config, _ = trained
    bare = _copy(config)
    del bare["eval"]
    ec = eval_config_lib.eval_config(bare)
    assert ec.every_steps == 0 and ec.fid.inception_path == "" and ec.zeroshot.retrieval_max == 5000
    assert not eval_config_lib.evals_due(bare, 100)
    bare.eval = {"every_steps": 5, "fid": {"inception_path": "/x.pth"}}
    ec = eval_config_lib.eval_config(bare)
    assert ec.every_steps == 5 and ec.fid.inception_path == "/x.pth" and ec.fid.resize_mode == "pytorch_fid"
    assert eval_config_lib.parse_names(None) == ["recon", "fid", "zeroshot"]
    assert zeroshot_setup.zero_shot_templates(bare)[0] == "a {}."  # embedded prompts
    bare.eval = {"zeroshot": {"class_names": "imagenet"}}
    names = zeroshot_setup.zero_shot_class_names(bare)
    assert len(names) == 1000 and len(zeroshot_setup.zero_shot_templates(bare, None, names)) == 80


def test_checkpoint_resolution(trained, tmp_path, fixtures_dir):
    config, workdir = trained
    step_dir = os.path.join(workdir, "checkpoints", "0")
    assert checkpointing.resolve_checkpoint(workdir) == step_dir
    assert checkpointing.resolve_checkpoint(os.path.join(workdir, "checkpoints")) == step_dir
    assert checkpointing.resolve_checkpoint(0, workdir) == step_dir
    with pytest.raises(ValueError, match="workdir"):
        checkpointing.resolve_checkpoint("2")
    with pytest.raises(FileNotFoundError, match="step 7"):
        checkpointing.resolve_checkpoint(7, workdir)
    with pytest.raises(FileNotFoundError):
        checkpointing.resolve_checkpoint(str(tmp_path / "nope"))
    # Official weights through the converter (the parity fixture holds official-format keys under param/).
    meta = json.loads((fixtures_dir / "unitok_tiny.json").read_text())
    official_cfg = _copy(config)
    official_cfg.model = meta["model_config"]
    model, step = load_tokenizer(str(fixtures_dir / "unitok_tiny.npz"), official_cfg)
    assert step is None and model.config.quantizer.num_codebooks == meta["model_config"]["quantizer"]["num_codebooks"]

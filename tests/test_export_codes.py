"""Code export: every record of a split becomes {codes [k, h, w], caption, label, id} in ArrayRecord shards; the codes
are exactly `img_to_idx` of the eval-transformed image; bad records are skipped and counted; the CLI works."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax

from train_helpers import ROOT, micro_config
from unitok_jax import export_codes
from unitok_jax.data import pipeline, records
from unitok_jax.demo import create_demo_checkpoint
from unitok_jax.evals import runner
from unitok_jax.load import load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codes")
    config = micro_config(tmp, gan=False)
    workdir = create_demo_checkpoint(config, str(tmp / "run"))
    model, step = load_tokenizer(workdir, config)
    return config, workdir, model


def test_codes_match_img_to_idx_and_records(demo, tmp_path):
    config, _, model = demo
    out = str(tmp_path / "codes")
    manifest = export_codes.export_codes(config, model, out, split="eval", batch_size=6, records_per_shard=5)
    assert manifest["format"] == export_codes.FORMAT
    assert manifest["num_records"] == 16 and manifest["num_skipped"] == 0
    assert manifest["code_shape"] == [4, 2, 2] and manifest["codebook_size"] == 64 and manifest["dtype"] == "uint16"
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 1]
    assert json.load(open(os.path.join(out, "manifest.json")))["num_records"] == 16
    exported = list(export_codes.read_codes(out))
    assert len(exported) == 16

    loader = pipeline.make_eval_loader(config.data, batch_size=16)
    batch = next(iter(loader))
    expected = np.asarray(jax.jit(lambda x: model.img_to_idx(x))(batch["image"]))  # [16, k, h*w]
    raw = [records.decode_record(r) for f in pipeline.eval_files(config.data) for r in records.iter_array_record(f)]
    for i, rec in enumerate(exported):
        assert rec["codes"].shape == (4, 2, 2) and rec["codes"].dtype == np.int32
        np.testing.assert_array_equal(rec["codes"].reshape(4, -1), expected[i])
        assert rec["id"] == raw[i]["id"] and rec["caption"] == raw[i]["caption"] and rec["label"] == raw[i]["label"]
        assert rec["label"] == batch["label"][i]
        assert 0 <= rec["codes"].min() and rec["codes"].max() < 64


def test_bad_records_are_skipped_and_max_examples(demo, tmp_path):
    config, _, model = demo
    good = [records.decode_record(r) for f in pipeline.eval_files(config.data) for r in records.iter_array_record(f)]
    path = tmp_path / "mixed.array_record"
    mixed = good[:3] + [{"id": "broken", "image": b"not an image", "caption": "x", "label": 1}] + good[3:6]
    records.write_array_record(path, mixed)
    m = export_codes.export_codes(config, model, str(tmp_path / "out"), files=str(path), batch_size=4)
    assert m["num_records"] == 6 and m["num_skipped"] == 1
    assert [r["id"] for r in export_codes.read_codes(str(tmp_path / "out"))] == [g["id"] for g in good[:6]]
    m = export_codes.export_codes(config, model, str(tmp_path / "out2"), files=str(path), batch_size=4, max_examples=2)
    assert m["num_records"] == 2


def test_record_round_trip_and_wide_codebooks():
    codes = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    rec = export_codes.decode_codes_record(export_codes.encode_codes_record("a", codes, "cap", 7, codebook_size=4096))
    np.testing.assert_array_equal(rec["codes"], codes)
    assert (rec["id"], rec["caption"], rec["label"]) == ("a", "cap", 7)
    big = np.asarray([[[70000]]])
    assert (
        export_codes.decode_codes_record(export_codes.encode_codes_record("b", big, codebook_size=100000))["codes"][
            0, 0, 0
        ]
        == 70000
    )
    with pytest.raises(ValueError, match="n_codebooks"):
        export_codes.encode_codes_record("c", np.zeros((2, 2)))


@pytest.mark.slow
def test_cli(demo, tmp_path):
    _, workdir, _ = demo
    out = tmp_path / "cli_codes"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.export_codes",
            f"--checkpoint={workdir}",
            f"--output_dir={out}",
            "--split=train",
            "--batch_size=16",
            "--max_examples=20",
        ],
        cwd=str(ROOT),
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 20 code records [4, 2, 2]" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 0 and manifest["checkpoint"].endswith(os.path.join("checkpoints", "0"))
    assert len(list(export_codes.read_codes(str(out)))) == 20


_MP_DRIVER = r'''
import json, os, sys
import jax
pid, n, port, workdir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n, process_id=pid)
from unitok_jax import evaluate, export_codes
from unitok_jax.load import load_run
report = evaluate.evaluate(None, workdir, evals="recon,zeroshot", output=os.path.join(out, "report.json"))
run = load_run(workdir)
config, model = run.config, run.model
export_codes.export_codes(config, model, os.path.join(out, "codes"), split="eval", batch_size=3, records_per_shard=4)
'''


@pytest.mark.slow
def test_two_processes_match_one(demo, tmp_path):
    """jax.distributed on CPU (2 processes): each reads its share of the eval set; metrics reduced across processes
    equal the single-process ones, and the code shards of both processes are listed in one manifest."""
    import socket

    config, workdir, model = demo
    single = runner.run_evals(config, model, "recon,zeroshot")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MP_DRIVER, str(i), "2", str(port), workdir, str(tmp_path)],
            cwd=str(ROOT),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta/process_count"] == 2
    for key in ("recon/num_images", "zeroshot/count", "zeroshot/retrieval/count", "recon/usage", "recon/num_tokens"):
        assert report[key] == single[key], key
    for key in (
        "recon/psnr",
        "recon/ssim",
        "recon/perplexity",
        "zeroshot/top1",
        "zeroshot/top5",
        "zeroshot/retrieval/image_to_text/R@5",
    ):
        assert report[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["num_records"] == 16 and sorted({s["process"] for s in manifest["shards"]}) == [0, 1]
    ids = sorted(r["id"] for r in export_codes.read_codes(str(tmp_path / "codes")))
    assert ids == [f"embedded-eval-{i:07d}" for i in range(16)]


def test_loading_a_checkpoint_set_aside_as_damaged_warns(demo, tmp_path, caplog):
    """A step under `checkpoints.damaged/` loads (for inspection) but says what it is instead of succeeding silently."""
    import logging
    import shutil

    _, workdir, _ = demo
    damaged = tmp_path / "run" / "checkpoints.damaged"
    shutil.copytree(os.path.join(workdir, "checkpoints", "0"), damaged / "0")
    with caplog.at_level(logging.WARNING):
        load_tokenizer(str(damaged / "0"))
    assert any("'.damaged' directory" in r.getMessage() for r in caplog.records)

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
from unitok_jax.evals import runner


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codes")
    config = micro_config(tmp, gan=False)
    workdir = runner.create_demo_checkpoint(config, str(tmp / "run"))
    model, step = runner.load_model_from_checkpoint(config, workdir)
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
    assert export_codes.decode_codes_record(export_codes.encode_codes_record("b", big, codebook_size=100000))["codes"][0, 0, 0] == 70000
    with pytest.raises(ValueError, match="n_codebooks"):
        export_codes.encode_codes_record("c", np.zeros((2, 2)))


def test_cli(demo, tmp_path):
    _, workdir, _ = demo
    out = tmp_path / "cli_codes"
    proc = subprocess.run(
        [sys.executable, "-m", "unitok_jax.export_codes", f"--checkpoint={workdir}", f"--output_dir={out}",
         "--split=train", "--batch_size=16", "--max_examples=20"],
        cwd=str(ROOT), env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 20 code records [4, 2, 2]" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 0 and manifest["checkpoint"].endswith(os.path.join("checkpoints", "0"))
    assert len(list(export_codes.read_codes(str(out)))) == 20

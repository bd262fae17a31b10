"""End to end: a webdataset tar written here (with malformed samples) → unitok_jax.data.ingest → ArrayRecord shards
→ a few trainer steps with config.data.name='array_record'. Bad samples are dropped and counted at both ends:
ingest counts what it can see without decoding (missing caption / image) in the manifest; the undecodable images
it was told not to verify reach training, where the pipeline skips them and `data/skipped` counts them.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from train_helpers import micro_config
from unitok_jax.data import ingest
from unitok_jax.train import trainer

pytestmark = pytest.mark.slow  # trains or compiles train steps

NUM_GOOD, NUM_UNDECODABLE = 16, 8


def _image_bytes(rng, fmt: str, size=(40, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset_tar(path, rng) -> None:
    """NUM_GOOD good samples, NUM_UNDECODABLE with broken image bytes (caption present), 2 without caption and
    1 caption without image, interleaved as a crawl would give them."""
    with tarfile.open(path, "w") as tar:
        for i in range(NUM_GOOD):
            fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[i % 2]
            _add(tar, f"good{i:03d}.{ext}", _image_bytes(rng, fmt))
            _add(tar, f"good{i:03d}.txt", f"a photo of thing {i}".encode())
            if i < NUM_UNDECODABLE:
                broken = b"definitely not an image" if i % 2 else _image_bytes(rng, "PNG")[:50]  # garbage / truncated
                _add(tar, f"bad{i:03d}.{'jpg' if i % 2 else 'png'}", broken)
                _add(tar, f"bad{i:03d}.txt", b"caption of a broken image")
        _add(tar, "nocap0.jpg", _image_bytes(rng, "JPEG"))
        _add(tar, "nocap1.png", _image_bytes(rng, "PNG"))
        _add(tar, "nocap1.txt", b"   ")
        _add(tar, "noimage.txt", b"caption without an image")


@pytest.mark.slow
def test_webdataset_to_array_record_to_training_counts_bad_samples(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "tars").mkdir()
    make_webdataset_tar(tmp_path / "tars" / "00000.tar", rng)
    out = tmp_path / "array_record"
    # verify_images=False: ingestion stays cheap (no decode) and broken images are left for training to skip.
    manifest = ingest.ingest_webdataset(
        str(tmp_path / "tars" / "*.tar"), str(out), options=ingest.IngestOptions(verify_images=False)
    )
    totals = manifest["totals"]
    assert totals["written"] == NUM_GOOD + NUM_UNDECODABLE
    assert totals["skip_reasons"] == {"missing caption": 2, "missing image": 1}

    config = micro_config(tmp_path, gan=False, batch=8, steps=3)
    config.data.name = "array_record"
    config.data.train_files = str(out / "*.array_record")
    config.data.eval_files = str(out / "*.array_record")
    config.data.tokenizer = "bytes"
    config.data.read_threads = 1
    config.data.prefetch = 8
    config.eval.every_steps = 0
    workdir = str(tmp_path / "run")
    summary = trainer.train(config, workdir)
    assert summary["final_step"] == 3

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    skipped = [r["data/skipped"] for r in records]
    assert skipped == sorted(skipped)  # a running total
    # 3 batches of 8 need 24 good records, more than the 16 of one epoch: the whole first epoch (all 8 broken
    # records) has been read, plus part of the second.
    assert NUM_UNDECODABLE <= skipped[-1] <= 2 * NUM_UNDECODABLE
    for r in records:
        assert np.isfinite(r["train/loss/total"]) and r["train/loss/l2"] > 0

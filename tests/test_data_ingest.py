"""Ingestion: webdataset tars (with bad samples), image folder + captions, TFDS (faked source), resume, CLI, and
the result read back by make_train_loader."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from unitok_jax.data import ingest, pipeline, records, sources


def _img(fmt, rng, size=(24, 20)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_tar(path, rng, n_good=6):
    """n_good good samples (jpg/png/webp, caption from .txt or .json) plus 5 bad ones."""
    with tarfile.open(path, "w") as tar:
        for i in range(n_good):
            key = f"{i:06d}"
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            _add(tar, f"{key}.{ext}", _img(fmt, rng))
            if i % 2:
                _add(tar, f"{key}.txt", f"caption {i}".encode())
                _add(tar, f"{key}.cls", str(i).encode())
            else:
                _add(tar, f"{key}.json", json.dumps({"caption": f"caption {i}", "label": i}).encode())
        _add(tar, "bad1.jpg", b"not a jpeg at all")  # undecodable
        _add(tar, "bad1.txt", b"caption")
        _add(tar, "bad2.png", _img("PNG", rng)[:60])  # truncated
        _add(tar, "bad2.txt", b"caption")
        _add(tar, "bad3.jpg", _img("JPEG", rng))  # no caption at all
        _add(tar, "bad4.png", _img("PNG", rng))  # empty caption
        _add(tar, "bad4.txt", b"  \n")
        _add(tar, "bad5.txt", b"caption without image")


def _loader_config(files, image_size=16):
    c = pipeline.default_data_config()
    c.name = "array_record"
    c.train_files = files
    c.eval_files = files
    c.image_size = image_size
    c.context_length = 16
    c.read_threads = 1
    c.prefetch = 8
    return c


def test_webdataset_ingest_resume_and_train(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "tars").mkdir()
    for s in range(3):
        _make_tar(tmp_path / "tars" / f"{s:05d}.tar", rng)
    out = tmp_path / "out"
    manifest = ingest.ingest_webdataset(str(tmp_path / "tars" / "{00000..00002}.tar"), str(out))
    assert manifest["complete"] and manifest["totals"]["written"] == 18 and manifest["totals"]["skipped"] == 15
    assert manifest["totals"]["skip_reasons"] == {"missing caption": 6, "missing image": 3, "undecodable image": 6}
    assert [s["output"] for s in manifest["shards"]] == [f"{s:05d}.array_record" for s in range(3)]
    recs = [records.decode_record(b) for b in records.iter_array_record(out / "00001.array_record")]
    assert [r["caption"] for r in recs] == [f"caption {i}" for i in range(6)]
    assert [r["label"] for r in recs] == list(range(6)) and recs[0]["id"] == "00001/000000"
    assert recs[0]["image"][:2] == b"\xff\xd8"  # stored as found (JPEG), not re-encoded

    # Resume: complete shards are not redone; a missing one is.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
    os.remove(out / "00002.array_record")
    again = ingest.ingest_webdataset(str(tmp_path / "tars" / "*.tar"), str(out))
    assert again["totals"] == manifest["totals"]
    assert (out / "00000.array_record").stat().st_mtime_ns == mtimes["00000.array_record"]
    assert (out / "00002.array_record").exists()

    # The output directory (via its manifest) feeds the training loader directly.
    assert len(sources.resolve_files(str(out))) == 3
    ds = pipeline.make_train_loader(
        _loader_config(str(out)), global_batch_size=6, seed=0, process_index=0, process_count=1, num_epochs=1
    )
    batches = list(ds)
    assert len(batches) == 3 and batches[0]["image"].shape == (6, 16, 16, 3)
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == sorted(list(range(6)) * 3)
    assert sum(int(b["num_skipped"].sum()) for b in batches) == 0  # bad samples were removed at ingest


def test_truncated_tar_keeps_good_prefix(tmp_path):
    rng = np.random.default_rng(1)
    _make_tar(tmp_path / "a.tar", rng, n_good=4)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    manifest = ingest.ingest_webdataset(str(tmp_path / "a.tar"), str(tmp_path / "out"))
    assert manifest["complete"] and 1 <= manifest["totals"]["written"] <= 4
    assert manifest["totals"]["skip_reasons"].get("corrupt tar", 0) == 1


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_image_folder_ingest(tmp_path, fmt):
    rng = np.random.default_rng(2)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for i in range(7):
        name = f"im{i}.{'png' if i % 2 else 'jpg'}"
        (img_dir / name).write_bytes(_img("PNG" if i % 2 else "JPEG", rng))
        rows.append((name, f"a picture, number {i}", i))
    (img_dir / "broken.jpg").write_bytes(b"\x00" * 50)
    rows += [("broken.jpg", "broken", 7), ("missing.jpg", "missing file", 8), ("im0.jpg", "", 9)]
    if fmt == "jsonl":
        text = "\n".join(json.dumps({"filename": f, "caption": c, "label": l}) for f, c, l in rows)
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(["filename", "caption", "label"])]
        lines += [sep.join([f, f'"{c}"' if fmt == "csv" else c, str(l)]) for f, c, l in rows]
        text = "\n".join(lines)
    captions = tmp_path / f"captions.{fmt}"
    captions.write_text(text)
    out = tmp_path / "out"
    manifest = ingest.ingest_image_folder(
        str(img_dir), str(captions), str(out), records_per_shard=4, num_workers=2 if fmt == "csv" else 1
    )
    assert len(manifest["shards"]) == 3 and manifest["complete"]
    assert manifest["totals"]["written"] == 7
    assert manifest["totals"]["skip_reasons"] == {"missing caption": 1, "missing image": 1, "undecodable image": 1}
    got = [records.decode_record(b) for f in sources.resolve_files(str(out)) for b in records.iter_array_record(f)]
    assert [(r["id"], r["caption"], r["label"]) for r in got] == [(f, c, l) for f, c, l in rows[:7]]
    ev = pipeline.make_eval_loader(_loader_config(str(out)), batch_size=4, process_index=0, process_count=1)
    assert sum(int(b["mask"].sum()) for b in ev) == 7


def test_tfds_ingest_with_fake_source(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)

    class FakeLabel:
        names = ["golden_retriever", "tabby_cat"]

    class FakeSource:
        class dataset_info:  # pylint: disable=invalid-name
            features = {"label": FakeLabel()}

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 3:
                raise OSError("bad block")
            return {"image": rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "label": i % 2}

    monkeypatch.setattr(ingest, "_tfds_source", lambda name, split, data_dir: FakeSource())
    manifest = ingest.ingest_tfds("fake_ds", str(tmp_path / "out"), records_per_shard=10)
    assert manifest["totals"]["written"] == 4 and manifest["totals"]["skip_reasons"] == {"unreadable example": 1}
    assert manifest["class_names"] == FakeLabel.names
    recs = [
        records.decode_record(b) for b in records.iter_array_record(tmp_path / "out" / manifest["shards"][0]["output"])
    ]
    dog, cat = "a photo of a golden retriever.", "a photo of a tabby cat."
    assert [r["caption"] for r in recs] == [dog, cat, dog, dog]  # examples 0, 1, 2, 4 (3 is unreadable)
    assert recs[0]["id"] == "fake_ds/train/0" and recs[0]["image"][:4] == b"\x89PNG"
    assert pipeline.class_names(_loader_config(str(tmp_path / "out"))) == FakeLabel.names


def test_cli(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_img("PNG", rng))
    (tmp_path / "caps.tsv").write_text("".join(f"{i}.png\tcaption {i}\n" for i in range(3)))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.data.ingest",
            "--kind=folder",
            f"--input={tmp_path / 'imgs'}",
            f"--captions={tmp_path / 'caps.tsv'}",
            f"--output_dir={tmp_path / 'out'}",
            "--num_workers=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["written"] == 3
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.data.ingest",
            "--kind=folder",
            "--input=x",
            f"--output_dir={tmp_path / 'o2'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode != 0 and "--captions" in res.stderr


def test_folder_per_class_ingest_feeds_zero_shot(tmp_path):
    """`root/<class>/<image>` (ImageNet's layout) without a captions file: label = sorted class index, caption from
    the class name, class names in the manifest, where the zero-shot eval's class-name lookup finds them."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet_val"
    for name, count in (("tench", 2), ("great_white_shark", 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(_img("JPEG", rng))
    (root / "tench" / "notes.txt").write_text("not an image")
    (root / "LICENSE").write_text("a file beside the class folders")
    out = tmp_path / "ar"
    manifest = ingest.ingest_image_folder(str(root), None, str(out), records_per_shard=4)
    assert manifest["class_names"] == ["great_white_shark", "tench"]
    got = sorted(
        (r["id"], r["caption"], r["label"])
        for f in sources.resolve_files(str(out))
        for r in map(records.decode_record, records.iter_array_record(f))
    )
    assert got == [
        ("great_white_shark/0.jpg", "a photo of a great white shark.", 0),
        ("great_white_shark/1.jpg", "a photo of a great white shark.", 0),
        ("great_white_shark/2.jpg", "a photo of a great white shark.", 0),
        ("tench/0.jpg", "a photo of a tench.", 1),
        ("tench/1.jpg", "a photo of a tench.", 1),
    ]
    assert pipeline.class_names(_loader_config(str(out))) == ["great_white_shark", "tench"]
    with pytest.raises(ValueError, match="no class sub-folders"):
        ingest.ingest_image_folder(str(root / "tench"), None, str(tmp_path / "x"))

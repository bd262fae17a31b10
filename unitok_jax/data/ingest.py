r"""Converts raw image-text data into unitok_jax ArrayRecord shards (+ manifest.json). Not used at training time.

Inputs:
  webdataset  tar shards in img2dataset layout: ``key.jpg|png|webp`` + ``key.txt`` (+ ``key.json`` / ``key.cls``);
              one output shard per input tar.
  folder      an image folder plus a captions file (CSV / TSV / JSONL with filename, caption[, label]), or without
              --captions a folder per class (root/<class>/<image>, ImageNet's layout): label = sorted class index,
              caption = ``caption_template.format(class_name)``, class names in the manifest.
  tfds        a TFDS dataset already prepared locally as ArrayRecord (read with ``tfds.data_source``, no
              TensorFlow); caption = ``caption_template.format(class_name)``.
Tars, image folders and captions files may be local or ``gs://``; the output directory must be local (or a
gcsfuse mount), as the ArrayRecord writer writes local files only.

Work is parallel over output shards (processes) and resumable: ``manifest.json`` is rewritten after every
finished shard, and a rerun skips shards it lists as complete. Undecodable images and missing captions are
counted per shard (with reasons) and skipped; image bytes are stored as found, not re-encoded.

  python -m unitok_jax.data.ingest --kind=webdataset --input='/data/cc3m/{00000..00331}.tar' --output_dir=/data/cc3m_ar
  python -m unitok_jax.data.ingest --kind=webdataset --input='/data/cc3m/*.tar' --output_dir=/data/cc3m_ar
  python -m unitok_jax.data.ingest --kind=folder --input=/data/imgs --captions=/data/caps.tsv --output_dir=/data/x
  python -m unitok_jax.data.ingest --kind=tfds --input=imagenette --split=train --tfds_data_dir=~/tensorflow_datasets \
      --output_dir=/data/imagenette_ar

Then train with ``--config.data.name=array_record --config.data.train_files=/data/cc3m_ar`` (dir or manifest).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import multiprocessing
import os
import posixpath
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags, logging

from unitok_jax import paths
from unitok_jax.data import records, transforms

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "unitok_jax.ingest/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_KEYS = ("caption", "text", "txt", "prompt")


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output shard: ``kind``-specific ``spec`` (picklable) -> ``output`` (a file name in output_dir)."""

    kind: str
    spec: Any
    output: str
    input_desc: str


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    verify_images: bool = True  # decode every image once to reject broken ones now rather than at train time
    require_caption: bool = True
    max_pixels: int = transforms.DEFAULT_MAX_PIXELS
    min_side: int = transforms.DEFAULT_MIN_SIDE
    caption_template: str = "a photo of a {}."


# ----------------------------------------------------------------------------------------------------------------
# Samples: every reader yields (id, image_bytes | None, caption | None, label | None, problem | None).


def _read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _caption_from_json(meta: dict[str, Any]) -> str | None:
    for key in CAPTION_KEYS:
        if isinstance(meta.get(key), str):
            return meta[key]
    return None


def _iter_webdataset(tar_path: str) -> Iterator[tuple]:
    """Groups consecutive tar members by key (basename up to the first dot, as webdataset does)."""
    prefix = paths.stem(tar_path)
    current_key, files = None, {}

    def emit(key, files):
        image = None
        for ext in IMAGE_EXTS:
            if ext in files:
                image = files[ext]
                break
        caption, label, meta = None, None, {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8", errors="replace"))
                meta = meta if isinstance(meta, dict) else {}
            except ValueError:
                meta = {}
        if "txt" in files:
            caption = _read_text(files["txt"])
        elif meta:
            caption = _caption_from_json(meta)
        if "cls" in files:
            try:
                label = int(_read_text(files["cls"]))
            except ValueError:
                label = None
        elif isinstance(meta.get("label"), int):
            label = meta["label"]
        return (f"{prefix}/{key}", image, caption, label, None)

    try:
        # A file object rather than a name, so gs:// tars are read too (their file objects seek, as "r:*" needs).
        with paths.open_file(tar_path, "rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # Member names use the archive's own '/' syntax, not the host's path rules: hence posixpath.
                dirname, base = posixpath.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = posixpath.join(dirname, stem) if dirname else stem
                if key != current_key:
                    if current_key is not None:
                        yield emit(current_key, files)
                    current_key, files = key, {}
                f = tar.extractfile(member)
                files[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated tar still contributes the samples before the damage; the rest is reported.
        if current_key is not None:
            yield emit(current_key, files)
            current_key = None
        yield (f"{prefix}/<tar>", None, None, None, f"corrupt tar: {type(e).__name__}: {e}")
    if current_key is not None:
        yield emit(current_key, files)


def _iter_folder(spec: dict[str, Any]) -> Iterator[tuple]:
    root = spec["root"]
    for filename, caption, label in spec["rows"]:
        try:
            image = paths.read_bytes(paths.join(root, filename))
        except OSError as e:
            yield (filename, None, caption, label, f"missing image: {e.strerror or e}")
            continue
        yield (filename, image, caption, label, None)


def _iter_tfds(spec: dict[str, Any]) -> Iterator[tuple]:
    source = _tfds_source(spec["name"], spec["split"], spec["data_dir"])
    names = spec["class_names"]
    for i in range(spec["start"], spec["stop"]):
        rid = f"{spec['name']}/{spec['split']}/{i}"
        try:
            example = source[i]
        except Exception as e:  # pylint: disable=broad-except
            yield (rid, None, None, None, f"unreadable example: {type(e).__name__}: {e}")
            continue
        image = example.get(spec["image_key"])
        label = example.get(spec["label_key"]) if spec["label_key"] else None
        label = None if label is None else int(label)
        if image is not None and not isinstance(image, (bytes, bytearray)):
            image = _encode_png(image)
        caption = None
        if label is not None and names and 0 <= label < len(names):
            caption = spec["caption_template"].format(names[label].replace("_", " "))
        yield (rid, image, caption, label, None)


def _encode_png(array) -> bytes:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tfds_source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # optional; reads ArrayRecord w/o TF

    return tfds.data_source(name, split=split, data_dir=data_dir)


_READERS: dict[str, Callable[[Any], Iterator[tuple]]] = {
    "webdataset": _iter_webdataset,
    "folder": _iter_folder,
    "tfds": _iter_tfds,
}


# ----------------------------------------------------------------------------------------------------------------
# One shard.


def _process_shard(args: tuple[ShardTask, str, IngestOptions]) -> dict[str, Any]:
    task, output_dir, opts = args
    start = time.time()
    reasons: Counter[str] = Counter()
    written = 0

    def good_records():
        nonlocal written
        for rid, image, caption, label, problem in _READERS[task.kind](task.spec):
            if problem is not None:
                reasons[problem.split(":")[0]] += 1
                logging.warning("%s: skipping %s: %s", task.input_desc, rid, problem)
                continue
            if image is None or len(image) == 0:
                reasons["missing image"] += 1
                continue
            caption = transforms.clean_caption(caption) if caption is not None else ""
            if opts.require_caption and not caption:
                reasons["missing caption"] += 1
                continue
            if opts.verify_images:
                try:
                    transforms.decode_image(image, max_pixels=opts.max_pixels, min_side=opts.min_side)
                except transforms.BadSample as e:
                    reasons[e.reason] += 1
                    logging.warning("%s: skipping %s: %s", task.input_desc, rid, e)
                    continue
            written += 1
            yield {"id": rid, "image": image, "caption": caption, "label": -1 if label is None else label}

    records.write_array_record(paths.join(output_dir, task.output), good_records())
    return {
        "input": task.input_desc,
        "output": task.output,
        "written": written,
        "skipped": sum(reasons.values()),
        "skip_reasons": dict(sorted(reasons.items())),
        "complete": True,
        "seconds": round(time.time() - start, 3),
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver: resumable, parallel over shards.


def _load_manifest(output_dir: str) -> dict[str, Any] | None:
    try:
        return paths.read_json(paths.join(output_dir, MANIFEST))
    except (OSError, ValueError):
        return None


def _write_manifest(output_dir: str, manifest: dict[str, Any]) -> None:
    paths.write_json_atomic(paths.join(output_dir, MANIFEST), manifest, indent=1)


def run_tasks(
    tasks: Sequence[ShardTask],
    output_dir: str,
    *,
    num_workers: int = 1,
    options: IngestOptions = IngestOptions(),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs the shard tasks not yet complete in ``output_dir``'s manifest; returns the final manifest."""
    # The shards are ArrayRecord files (local writer only): fail before any work rather than in every worker.
    output_dir = paths.require_local(output_dir, "writing ArrayRecord shards")
    paths.makedirs(output_dir)
    outputs = [t.output for t in tasks]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two input shards map to the same output name; rename the inputs")
    previous = _load_manifest(output_dir) or {}
    done = {
        s["output"]: s
        for s in previous.get("shards", [])
        if s.get("complete") and paths.exists(paths.join(output_dir, s["output"]))
    }
    shards = {t.output: done[t.output] for t in tasks if t.output in done and done[t.output]["input"] == t.input_desc}
    todo = [t for t in tasks if t.output not in shards]
    logging.info(
        "ingest: %d shards, %d already complete, %d to do, %d workers", len(tasks), len(shards), len(todo), num_workers
    )

    def manifest() -> dict[str, Any]:
        ordered = [shards[o] for o in outputs if o in shards]
        return {
            "format": MANIFEST_FORMAT,
            **(extra or {}),
            "complete": len(ordered) == len(tasks),
            "totals": {
                "shards": len(tasks),
                "complete_shards": len(ordered),
                "written": sum(s["written"] for s in ordered),
                "skipped": sum(s["skipped"] for s in ordered),
                "skip_reasons": dict(sum((Counter(s["skip_reasons"]) for s in ordered), Counter())),
            },
            "shards": ordered,
        }

    jobs = [(t, output_dir, options) for t in todo]
    if num_workers <= 1 or len(jobs) <= 1:
        results = map(_process_shard, jobs)
        pool = None
    else:
        # spawn, not fork: the parent may have JAX (threads) loaded.
        pool = multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs)))
        results = pool.imap_unordered(_process_shard, jobs)
    try:
        for result in results:
            shards[result["output"]] = result
            _write_manifest(output_dir, manifest())
            logging.info(
                "ingest: %s -> %s: %d written, %d skipped %s",
                result["input"],
                result["output"],
                result["written"],
                result["skipped"],
                result["skip_reasons"],
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    final = manifest()
    _write_manifest(output_dir, final)
    return final


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}{records.ARRAY_RECORD_SUFFIX}"


def _expand_braces(pattern: str) -> list[str]:
    """``a{000..002}.tar`` -> [a000.tar, a001.tar, a002.tar] (the webdataset/img2dataset shard notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end() :]))
    return out


def _expand_inputs(spec: str | Sequence[str]) -> list[str]:
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    files = []
    for part in parts:
        for pattern in _expand_braces(part):
            matched = paths.glob(pattern) if paths.has_magic(pattern) else [paths.resolve(pattern)]
            files.extend(m for m in matched if paths.isfile(m))
    if not files:
        raise FileNotFoundError(f"no input files match {spec!r}")
    return files


def ingest_webdataset(
    tar_patterns: str | Sequence[str],
    output_dir: str,
    *,
    num_workers: int = 1,
    options: IngestOptions = IngestOptions(),
) -> dict[str, Any]:
    """Tar shards (globs / ``{000..123}`` ranges / comma lists) -> one ArrayRecord shard per tar + manifest."""
    tars = _expand_inputs(tar_patterns)
    stems = [paths.stem(t) for t in tars]
    if len(set(stems)) != len(stems):  # same basename in different dirs: keep outputs distinct
        stems = [f"{i:05d}-{s}" for i, s in enumerate(stems)]
    tasks = [ShardTask("webdataset", t, s + records.ARRAY_RECORD_SUFFIX, paths.resolve(t)) for t, s in zip(tars, stems)]
    return run_tasks(tasks, output_dir, num_workers=num_workers, options=options, extra={"kind": "webdataset"})


def read_captions_file(path: str) -> list[tuple[str, str | None, int | None]]:
    """CSV / TSV (optional header with filename,caption[,label]) or JSONL -> [(filename, caption, label)]."""
    rows: list[tuple[str, str | None, int | None]] = []

    def label_of(value) -> int | None:
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    # Decoded here rather than by open_file: epath's Path.open takes neither errors= nor newline= (csv needs the latter).
    with io.TextIOWrapper(paths.open_file(path, "rb"), encoding="utf-8", errors="replace", newline="") as f:
        if path.endswith((".jsonl", ".json")):
            for n, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n + 1}: not JSON ({e})") from None
                name = next(
                    (obj[k] for k in ("filename", "file", "image", "path") if isinstance(obj.get(k), str)), None
                )
                if name is None:
                    raise ValueError(f"{path}:{n + 1}: no 'filename' field")
                rows.append((name, _caption_from_json(obj), label_of(obj.get("label"))))
            return rows
        delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
        reader = csv.reader(f, delimiter=delimiter)
        header = None
        for n, row in enumerate(reader):
            if not row:
                continue
            if n == 0 and {"filename", "caption"} <= {c.strip().lower() for c in row}:
                header = [c.strip().lower() for c in row]
                continue
            if header:
                d = dict(zip(header, row))
                rows.append((d.get("filename", ""), d.get("caption"), label_of(d.get("label"))))
            else:
                rows.append((row[0], row[1] if len(row) > 1 else None, label_of(row[2]) if len(row) > 2 else None))
    return rows


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")


def class_folder_rows(image_dir: str, caption_template: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """`root/<class>/<image>` (the ImageNet train/val layout) -> ([(relative path, caption, label)], class names).

    Classes are the sub-folders in sorted order (label = index, as torchvision's ImageFolder assigns them); the
    caption is `caption_template` with the class name (underscores as spaces)."""
    classes = sorted(d for d in paths.listdir(image_dir) if paths.isdir(paths.join(image_dir, d)))
    if not classes:
        raise ValueError(f"{image_dir} has no class sub-folders (expected root/<class>/<image>; or pass --captions)")
    rows = []
    for label, name in enumerate(classes):
        caption = caption_template.format(name.replace("_", " "))
        for filename in sorted(paths.listdir(paths.join(image_dir, name))):
            if filename.lower().endswith(IMAGE_SUFFIXES):
                rows.append((f"{name}/{filename}", caption, label))
    return rows, classes


def ingest_image_folder(
    image_dir: str,
    captions_file: str | None,
    output_dir: str,
    *,
    records_per_shard: int = 5000,
    num_workers: int = 1,
    options: IngestOptions = IngestOptions(),
) -> dict[str, Any]:
    """Image folder -> ArrayRecord shards of ``records_per_shard`` rows each + manifest.

    With a captions file (CSV / TSV / JSONL): the images it lists. Without one: a folder per class
    (`root/<class>/<image>`), captions from ``options.caption_template`` and the class names in the manifest, where
    the zero-shot eval finds them."""
    class_names: list[str] = []
    if captions_file:
        rows = read_captions_file(captions_file)
        source = paths.resolve(captions_file)
    else:
        rows, class_names = class_folder_rows(image_dir, options.caption_template)
        source = paths.resolve(image_dir)
    if not rows:
        raise ValueError(f"{captions_file or image_dir} lists no images")
    n = -(-len(rows) // records_per_shard)
    tasks = []
    for i in range(n):
        chunk = rows[i * records_per_shard : (i + 1) * records_per_shard]
        tasks.append(
            ShardTask(
                "folder",
                {"root": paths.resolve(image_dir), "rows": chunk},
                _shard_name(i, n),
                f"{source}[{i * records_per_shard}:{i * records_per_shard + len(chunk)}]",
            )
        )
    extra: dict[str, Any] = {"kind": "folder"}
    if class_names:
        extra["class_names"] = class_names
    return run_tasks(tasks, output_dir, num_workers=num_workers, options=options, extra=extra)


def ingest_tfds(
    name: str,
    output_dir: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    records_per_shard: int = 5000,
    num_workers: int = 1,
    options: IngestOptions = IngestOptions(),
    image_key: str = "image",
    label_key: str = "label",
) -> dict[str, Any]:
    """A locally prepared TFDS dataset (ArrayRecord format) -> shards; captions from class names."""
    source = _tfds_source(name, split, data_dir)
    total = len(source)
    class_names: list[str] = []
    try:
        class_names = list(source.dataset_info.features[label_key].names)
    except Exception:  # pylint: disable=broad-except  # no ClassLabel feature: captions cannot be made
        logging.warning("%s has no class names under %r; every sample will lack a caption", name, label_key)
    n = max(1, -(-total // records_per_shard))
    tasks = []
    for i in range(n):
        start, stop = i * total // n, (i + 1) * total // n
        spec = {
            "name": name,
            "split": split,
            "data_dir": data_dir,
            "start": start,
            "stop": stop,
            "class_names": class_names,
            "image_key": image_key,
            "label_key": label_key,
            "caption_template": options.caption_template,
        }
        tasks.append(ShardTask("tfds", spec, _shard_name(i, n), f"tfds:{name}/{split}[{start}:{stop}]"))
    return run_tasks(
        tasks, output_dir, num_workers=num_workers, options=options, extra={"kind": "tfds", "class_names": class_names}
    )


# ----------------------------------------------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("kind", None, ["webdataset", "folder", "tfds"], "Input kind.")
    flags.DEFINE_string("input", None, "webdataset: tar globs/ranges; folder: image dir; tfds: dataset name.")
    flags.DEFINE_string("output_dir", None, "Where shards and manifest.json go.")
    flags.DEFINE_string(
        "captions", None, "folder: CSV/TSV/JSONL with filename,caption[,label]; none = one sub-folder per class."
    )
    flags.DEFINE_string("split", "train", "tfds: split.")
    flags.DEFINE_string("tfds_data_dir", None, "tfds: data_dir holding the prepared dataset.")
    flags.DEFINE_string("caption_template", "a photo of a {}.", "tfds / class folders: caption from class name.")
    flags.DEFINE_integer("records_per_shard", 5000, "folder/tfds: records per output shard.")
    flags.DEFINE_integer("num_workers", max(1, (os.cpu_count() or 2) - 1), "Parallel shard writers.")
    flags.DEFINE_bool("verify_images", True, "Decode each image once and drop undecodable ones.")
    flags.DEFINE_bool("require_caption", True, "Drop samples without a caption.")


def main(argv: Sequence[str]) -> None:
    del argv
    for name in ("kind", "input", "output_dir"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    opts = IngestOptions(
        verify_images=FLAGS.verify_images,
        require_caption=FLAGS.require_caption,
        caption_template=FLAGS.caption_template,
    )
    if FLAGS.kind == "webdataset":
        manifest = ingest_webdataset(FLAGS.input, FLAGS.output_dir, num_workers=FLAGS.num_workers, options=opts)
    elif FLAGS.kind == "folder":
        manifest = ingest_image_folder(
            FLAGS.input,
            FLAGS.captions or None,
            FLAGS.output_dir,
            records_per_shard=FLAGS.records_per_shard,
            num_workers=FLAGS.num_workers,
            options=opts,
        )
    else:
        manifest = ingest_tfds(
            FLAGS.input,
            FLAGS.output_dir,
            split=FLAGS.split,
            data_dir=FLAGS.tfds_data_dir,
            records_per_shard=FLAGS.records_per_shard,
            num_workers=FLAGS.num_workers,
            options=opts,
        )
    print(json.dumps(manifest["totals"], indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)

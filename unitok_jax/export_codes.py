"""Export the discrete codes of a dataset to ArrayRecord, for downstream autoregressive / MLLM training.

    python -m unitok_jax.export_codes --checkpoint=runs/tiny --output_dir=runs/tiny/codes_eval --split=eval
    python -m unitok_jax.export_codes --config=configs/unitok.py:b16_single_gpu --checkpoint=/runs/b16 \\
        --files='/data/cc3m_ar/*.array_record' --output_dir=/data/cc3m_codes --batch_size=256

Input: our ArrayRecord records (`data/records.py`): --files (glob / dir / manifest.json), else the --split of
config.data (embedded or array_record). Images get the eval transform (shorter-side resize + center crop to
config.data.image_size). Undecodable records are skipped and counted.

Output: `codes-<process>-<shard>.array_record` shards plus `manifest.json` (format `unitok_jax.codes/1`: model
and code-grid description, shard list, counts). One msgpack record per image:
    {"id": str, "caption": str, "label": int, "shape": [n_codebooks, h, w], "dtype": "uint16"|"int32",
     "codes": bytes (little-endian, C order)}
`decode_codes_record(bytes)` turns one back into {"id", "caption", "label", "codes": np.ndarray [k, h, w]};
`read_codes(output_dir)` iterates over all of them. Multi-process: add --distributed; each process exports every
P-th record into its own shards and process 0 writes the manifest (--coordinator_address, --num_processes,
--process_id for a local rehearsal).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from unitok_jax import distributed
from unitok_jax import paths as _paths  # not `paths`: export_codes() uses that name for its input files

FORMAT = "unitok_jax.codes/1"
MANIFEST = "manifest.json"

_FLAGS: dict = {}


def _define_flags() -> None:
    """CLI flags, defined only when run as a program (so this module imports alongside other CLIs)."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file (data settings); default: the checkpoint's saved config.", lock_config=False
    )
    flags.DEFINE_string(
        "checkpoint", None, "Run workdir, checkpoints dir, step dir, step number, or official .pth/.npz."
    )
    flags.DEFINE_string("workdir", None, "Run directory, when --checkpoint is a step number.")
    flags.DEFINE_string(
        "output_dir", None, "Directory for the code shards and manifest.json (local or a gcsfuse mount, not gs://)."
    )
    flags.DEFINE_string("files", "", "ArrayRecord glob / dir / manifest to export (default: config.data --split).")
    flags.DEFINE_enum("split", "train", ["train", "eval"], "Split of config.data, when --files is not given.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass (per process).")
    flags.DEFINE_integer("records_per_shard", 10_000, "Records per output shard.")
    flags.DEFINE_integer("max_examples", 0, "Export at most this many records (0 = all).")
    distributed.define_flags(flags)
    flags.mark_flags_as_required(["checkpoint", "output_dir"])


# ----------------------------------------------------------------------------------------------------------------
# Record format
# ----------------------------------------------------------------------------------------------------------------
def codes_dtype(codebook_size: int) -> np.dtype:
    return np.dtype("<u2") if codebook_size <= 65536 else np.dtype("<i4")


def encode_codes_record(
    record_id: str, codes: np.ndarray, caption: str = "", label: int = -1, codebook_size: int | None = None
) -> bytes:
    codes = np.asarray(codes)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [n_codebooks, h, w], got shape {codes.shape}")
    dtype = codes_dtype(codebook_size if codebook_size is not None else int(codes.max(initial=0)) + 1)
    return msgpack.packb(
        {
            "id": str(record_id),
            "caption": str(caption),
            "label": int(label),
            "shape": [int(s) for s in codes.shape],
            "dtype": "uint16" if dtype == np.dtype("<u2") else "int32",
            "codes": np.ascontiguousarray(codes.astype(dtype)).tobytes(),
        },
        use_bin_type=True,
    )


def decode_codes_record(data: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(bytes(data), raw=False)
    dtype = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}[obj["dtype"]]
    codes = np.frombuffer(obj["codes"], dtype=dtype).reshape(obj["shape"]).astype(np.int32)
    return {"id": obj["id"], "caption": obj["caption"], "label": int(obj["label"]), "codes": codes}


def read_codes(output_dir: str) -> Iterator[dict[str, Any]]:
    """All exported records, shard by shard in manifest order."""
    from unitok_jax.data import records

    manifest = _paths.read_json(_paths.join(output_dir, MANIFEST))
    for shard in manifest["shards"]:
        for raw in records.iter_array_record(_paths.join(output_dir, shard["file"])):
            yield decode_codes_record(raw)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def _input_files(config, files: str, split: str) -> list[str]:
    from unitok_jax.data import pipeline, sources

    if files:
        return sources.resolve_files(files, split=split)
    if split == "eval":
        return pipeline.eval_files(config.data)
    out: list[str] = []
    for shard_files, _ in pipeline.train_sources(config.data):
        out.extend(f for f in shard_files if f not in out)
    return out


def _decoded(source, indices: Sequence[int], image_size: int, skipped: list[int]):
    from unitok_jax.data import records, transforms

    for i in indices:
        try:
            rec = records.decode_record(source[i])
            image = transforms.eval_transform(rec["image"], image_size)
        except (ValueError, transforms.BadSample) as e:
            skipped[0] += 1
            logging.warning("skipping record #%d: %s", i, e)
            continue
        yield rec, image


class _ShardWriter:
    def __init__(self, output_dir: str, process_index: int, records_per_shard: int):
        self.output_dir = output_dir
        self.process_index = process_index
        self.records_per_shard = max(1, records_per_shard)
        self.pending: list[bytes] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, record: bytes) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.records_per_shard:
            self.flush()

    def flush(self) -> None:
        from unitok_jax.data import records

        if not self.pending:
            return
        name = f"codes-{self.process_index:05d}-{len(self.shards):05d}.array_record"
        count = records.write_array_record(_paths.join(self.output_dir, name), self.pending)
        self.shards.append({"file": name, "count": count, "process": self.process_index})
        self.pending = []


def export_codes(
    config,
    model,
    output_dir: str,
    *,
    files: str = "",
    split: str = "train",
    batch_size: int = 64,
    records_per_shard: int = 10_000,
    max_examples: int = 0,
    checkpoint: str = "",
    step: int | None = None,
) -> dict[str, Any]:
    """Tokenise the records and write code shards + manifest.json; returns the manifest (collective if multi-process)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unitok_jax.data import records

    t0 = time.time()
    # The shards are ArrayRecord files (local writer only): fail here, not after the first shard's worth of work.
    _paths.require_local(output_dir, "writing ArrayRecord code shards")
    _paths.makedirs(output_dir)
    paths = _input_files(config, files, split)
    source = records.read_array_records(paths)
    total = len(source) if not max_examples else min(len(source), int(max_examples))
    pid, nproc = jax.process_index(), jax.process_count()
    mine = range(pid, total, nproc)
    image_size = int(config.data.image_size)
    qcfg = model.config.quantizer
    k, codebook_size = int(qcfg.num_codebooks), int(qcfg.codebook_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def to_codes(state, images):
        return nnx.merge(graphdef, state).img_to_idx(images)

    writer = _ShardWriter(output_dir, pid, records_per_shard)
    skipped = [0]
    grid_hw = (image_size // 16, image_size // 16)
    batch_recs: list[dict[str, Any]] = []
    batch_imgs: list[np.ndarray] = []

    def run_batch():
        n = len(batch_imgs)
        images = np.stack(batch_imgs + [batch_imgs[-1]] * (batch_size - n))  # fixed shape: one compilation
        idx = np.asarray(jax.device_get(to_codes(state, jnp.asarray(images))))[:n]  # [n, k, h*w]
        for rec, codes in zip(batch_recs, idx):
            writer.add(
                encode_codes_record(rec["id"], codes.reshape(k, *grid_hw), rec["caption"], rec["label"], codebook_size)
            )
        batch_recs.clear()
        batch_imgs.clear()

    for rec, image in _decoded(source, mine, image_size, skipped):
        batch_recs.append(rec)
        batch_imgs.append(image)
        if len(batch_imgs) == batch_size:
            run_batch()
    if batch_imgs:
        run_batch()
    writer.flush()

    # Process 0 writes the manifest with every process's shards (collective gather of the shard lists).
    shards, skipped_total = writer.shards, skipped[0]
    if nproc > 1:
        from jax.experimental import multihost_utils

        counts = multihost_utils.process_allgather(np.asarray([len(shards), skipped_total], np.int64))
        skipped_total = int(np.asarray(counts)[:, 1].sum())
        multihost_utils.sync_global_devices("export_codes_shards_written")
        shards = []
        for p in range(nproc):
            for s in range(int(np.asarray(counts)[p, 0])):
                name = f"codes-{p:05d}-{s:05d}.array_record"
                shards.append(
                    {"file": name, "count": records.count_array_records(_paths.join(output_dir, name)), "process": p}
                )
    manifest = {
        "format": FORMAT,
        "checkpoint": checkpoint,
        "step": step,
        "inputs": paths,
        "image_size": image_size,
        "num_codebooks": k,
        "codebook_size": codebook_size,
        "grid": list(grid_hw),
        "code_shape": [k, *grid_hw],
        "dtype": "uint16" if codes_dtype(codebook_size) == np.dtype("<u2") else "int32",
        "record_keys": ["id", "caption", "label", "shape", "dtype", "codes"],
        "num_records": int(sum(s["count"] for s in shards)),
        "num_skipped": skipped_total,
        "shards": shards,
        "seconds": time.time() - t0,
    }
    if pid == 0:
        _paths.write_json_atomic(_paths.join(output_dir, MANIFEST), manifest, indent=2)
    return manifest


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    from unitok_jax.load import load_run

    distributed.initialize_from_flags(FLAGS)
    try:
        run = load_run(FLAGS.checkpoint, _FLAGS["config"].value, workdir=FLAGS.workdir)
    except ValueError as e:  # no config saved with it / an official file: --config is needed
        raise app.UsageError(f"{e} (--config)") from e
    config, model, path, step = run.config, run.model, run.path, run.step
    manifest = export_codes(
        config,
        model,
        FLAGS.output_dir,
        files=FLAGS.files,
        split=FLAGS.split,
        batch_size=FLAGS.batch_size,
        records_per_shard=FLAGS.records_per_shard,
        max_examples=FLAGS.max_examples,
        checkpoint=path,
        step=step,
    )
    if jax.process_index() == 0:
        print(
            f"[unitok_jax] wrote {manifest['num_records']} code records {manifest['code_shape']} "
            f"({manifest['num_skipped']} skipped) to {FLAGS.output_dir} in {manifest['seconds']:.1f}s"
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)

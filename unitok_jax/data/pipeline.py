"""Grain input pipelines: ArrayRecord shards -> shuffled, sharded, decoded, tokenised numpy batches.

Train: source(s) -> global shuffle (reshuffled every epoch) -> repeat -> [mixture] -> decode + crop + tokenise
(per-example RNG from (seed, global index), so independent of process and worker counts) -> this process's shard
-> drop bad samples, counting them -> batch (drop remainder) -> optional worker processes. The result is a
``grain.IterDataset``; its iterator is checkpointable (``iterator_state`` / ``restore_iterator``, or Orbax via
``grain_checkpoint_save_args``). Eval: no shuffle, single pass, bad samples and the padding of the last batch come
back as ``mask == False`` rows, and every process yields the same number of batches (multi-host lockstep).
This module yields host-local numpy; turning batches into global ``jax.Array`` s is the trainer's job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from unitok_jax import paths
from unitok_jax.data import embedded, records, sources, text_tokenizer, transforms

NAMES = ("embedded", "array_record")
# Name of the data-iterator item inside the trainer's Orbax composite checkpoint.
CHECKPOINT_ITEM_NAME = "data_iter"
# After this many bad records in a row the data is surely wrong (wrong files, wrong format): fail loudly.
MAX_CONSECUTIVE_BAD = 10_000
_LOG_FIRST_SKIPS = 50
_LOG_EVERY_SKIPS = 1000


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for ``config.data``; see the module docstring for how each field is used."""
    c = ml_collections.ConfigDict()
    c.name = "embedded"  # 'embedded' (procedural, offline) | 'array_record' (ingested shards)
    c.data_dir = ""  # embedded cache dir; '' -> $UNITOK_DATA_DIR or ~/.cache/unitok_jax/data
    c.train_files = ""  # array_record: comma-separated globs / dirs / manifest.json
    c.eval_files = ""
    c.sources = []  # array_record mixture: [{'files': glob, 'weight': w}, ...]; overrides train_files
    c.embedded = ml_collections.ConfigDict({"num_train": 5000, "num_eval": 500, "image_size": 64, "seed": 0})
    c.image_size = 256
    c.crop_scale = (0.9, 1.0)  # open_clip RandomResizedCrop
    c.crop_ratio = (0.75, 4.0 / 3.0)
    c.tokenizer = "bytes"  # 'bytes' | 'clip_bpe'
    c.bpe_path = ""
    c.context_length = 77
    c.worker_count = 0  # Grain worker processes; 0 = decode in this process (read_threads threads)
    c.worker_buffer_size = 2  # batches buffered per worker
    c.read_threads = 4  # threads per process reading + decoding records
    c.prefetch = 128  # decoded examples read ahead per process
    return c


def complete_data_config(data_config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``default_data_config()`` overlaid with the given fields (a ConfigDict or dict; ``embedded`` merges per key).

    Unknown fields are an error (they are usually typos that would otherwise be ignored silently).
    """
    given = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(data_config)
    full = default_data_config().to_dict()
    unknown = sorted(set(given) - set(full))
    if unknown:
        raise ValueError(f"config.data has unknown field(s) {unknown}; known fields: {sorted(full)}")
    embedded_given = dict(given.pop("embedded", None) or {})
    unknown = sorted(set(embedded_given) - set(full["embedded"]))
    if unknown:
        raise ValueError(f"config.data.embedded has unknown field(s) {unknown}; known: {sorted(full['embedded'])}")
    full.update(given)
    full["embedded"].update(embedded_given)
    return ml_collections.ConfigDict(full)


def _err(field: str, value: Any, need: str) -> ValueError:
    return ValueError(f"config.data.{field}={value!r}: {need}")


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the offending ``config.data`` field and how to fix it."""
    cfg = complete_data_config(cfg)
    if cfg.name not in NAMES:
        raise _err("name", cfg.name, f"must be one of {list(NAMES)} (e.g. --config.data.name=embedded)")
    if int(cfg.image_size) < 8:
        raise _err("image_size", cfg.image_size, "must be >= 8 pixels")
    scale = tuple(cfg.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise _err("crop_scale", cfg.crop_scale, "must be (lo, hi) with 0 < lo <= hi <= 1, e.g. (0.9, 1.0)")
    ratio = tuple(cfg.crop_ratio)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise _err("crop_ratio", cfg.crop_ratio, "must be (lo, hi) with 0 < lo <= hi, e.g. (0.75, 1.3333)")
    if cfg.tokenizer not in text_tokenizer.TOKENIZERS:
        raise _err("tokenizer", cfg.tokenizer, f"must be one of {sorted(text_tokenizer.TOKENIZERS)}")
    if cfg.tokenizer == "clip_bpe" and not cfg.bpe_path:
        raise _err("bpe_path", cfg.bpe_path, "tokenizer 'clip_bpe' needs the path of bpe_simple_vocab_16e6.txt.gz")
    if int(cfg.context_length) < 2:
        raise _err("context_length", cfg.context_length, "must be >= 2 (SOT + EOT)")
    for field in ("worker_count", "read_threads", "prefetch"):
        if int(cfg[field]) < 0:
            raise _err(field, cfg[field], "must be >= 0")
    if int(cfg.worker_buffer_size) < 1:
        raise _err("worker_buffer_size", cfg.worker_buffer_size, "must be >= 1")
    if cfg.name == "embedded":
        e = cfg.embedded
        if int(e.num_train) < 1 or int(e.num_eval) < 1:
            raise _err("embedded", dict(e), "num_train and num_eval must be >= 1")
        if int(e.image_size) < 16:
            raise _err("embedded.image_size", e.image_size, "must be >= 16")
    else:
        if not cfg.train_files and not list(cfg.sources):
            raise _err(
                "train_files",
                cfg.train_files,
                "name='array_record' needs train_files (a glob of *.array_record, a directory or a manifest.json) "
                "or sources=[{'files': ..., 'weight': ...}]",
            )


def resolve_data_dir(data_dir: str) -> str:
    return paths.resolve(data_dir or os.environ.get("UNITOK_DATA_DIR") or "~/.cache/unitok_jax/data")


def _embedded_info(cfg) -> dict[str, Any]:
    e = cfg.embedded
    return embedded.build_embedded_dataset(
        resolve_data_dir(cfg.data_dir),
        num_train=int(e.num_train),
        num_eval=int(e.num_eval),
        image_size=int(e.image_size),
        seed=int(e.seed),
    )


def train_sources(cfg) -> list[tuple[list[str], float]]:
    """``[(files, weight), ...]`` the train loader reads (one entry unless a mixture is configured)."""
    cfg = complete_data_config(cfg)
    if cfg.name == "embedded":
        return [(_embedded_info(cfg)["train"], 1.0)]
    if list(cfg.sources):
        return sources.resolve_mixture([dict(s) for s in cfg.sources], split="train")
    return [(sources.resolve_files(cfg.train_files, split="train"), 1.0)]


def eval_files(cfg) -> list[str]:
    cfg = complete_data_config(cfg)
    if cfg.name == "embedded":
        return _embedded_info(cfg)["eval"]
    if not cfg.eval_files:
        raise _err("eval_files", cfg.eval_files, "name='array_record' needs eval_files for the eval loader")
    return sources.resolve_files(cfg.eval_files, split="eval")


def class_names(cfg) -> list[str] | None:
    """Class names for zero-shot evaluation: embedded's, or the ``class_names`` of an ingest manifest; else None."""
    cfg = complete_data_config(cfg)
    if cfg.name == "embedded":
        return embedded.class_names()
    for spec in [cfg.eval_files, cfg.train_files, *[s["files"] for s in cfg.sources]]:
        for part in str(spec or "").split(","):
            part = part.strip()
            if not part:
                continue
            path = paths.join(part, sources.MANIFEST) if paths.isdir(part) else part
            if paths.basename(path) == sources.MANIFEST and paths.exists(path):
                names = sources.read_manifest(path).get("class_names")
                if names:
                    return list(names)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Per-example work (runs in read threads / worker processes; must be picklable and thread-safe).

_skip_count = 0


def _log_skip(record_id: str, reason: str, detail: str) -> None:
    global _skip_count
    _skip_count += 1  # per process; approximate under threads, which only affects how often we log
    if _skip_count <= _LOG_FIRST_SKIPS or _skip_count % _LOG_EVERY_SKIPS == 0:
        logging.warning(
            "skipping record %s: %s (%s) [%d skipped in this process]", record_id, reason, detail[:200], _skip_count
        )


def _bad(record_id: str, err: transforms.BadSample) -> dict[str, Any]:
    _log_skip(record_id, err.reason, err.detail)
    return {"_bad": err.reason, "id": record_id}


class _DecodeExample(grain.transforms.MapWithIndex):
    """raw record bytes -> {"image": float32 [s, s, 3] in [-1, 1], "text": int32 [t], "label": int32} or a bad marker."""

    def __init__(self, *, train: bool, seed: int, image_size: int, scale, ratio, tokenizer):
        self.train = train
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.scale = tuple(float(x) for x in scale)
        self.ratio = tuple(float(x) for x in ratio)
        self.tokenizer = tokenizer

    def map_with_index(self, index: int, element: bytes):
        record_id = f"#{index}"
        try:
            try:
                rec = records.decode_record(element)
            except ValueError as e:
                raise transforms.BadSample("bad record", str(e)) from None
            record_id = rec["id"] or record_id
            image = transforms.decode_image(rec["image"])
            if self.train:
                # Seeded by the index in the repeated, shuffled stream: a record gets a new crop every epoch, and the
                # crop does not depend on how many processes or workers share the work.
                rng = np.random.default_rng([self.seed, index])
                image = transforms.random_resized_crop(image, self.image_size, rng, self.scale, self.ratio)
            else:
                image = transforms.resize_center_crop(image, self.image_size)
        except transforms.BadSample as e:
            return _bad(record_id, e)
        text = self.tokenizer([transforms.clean_caption(rec["caption"])])[0].astype(np.int32)
        return {"image": transforms.to_float(image), "text": text, "label": np.int32(rec["label"])}


class _DropBadIterDataset(grain.IterDataset):
    """Drops bad markers; each kept example carries ``num_skipped``: markers dropped since the previous one."""

    def __iter__(self):
        return _DropBadIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "DropBadIterDataset"


class _DropBadIterator(grain.DatasetIterator):
    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)  # StopIteration ends the stream; trailing bad records go uncounted
            if "_bad" not in element:
                element["num_skipped"] = np.int32(skipped)
                return element
            skipped += 1
            if skipped >= MAX_CONSECUTIVE_BAD:
                raise RuntimeError(
                    f"{skipped} consecutive records failed to decode (last: {element['id']}: {element['_bad']}); "
                    "the files are probably not unitok_jax records (see unitok_jax/data/records.py and ingest.py)"
                )

    def get_state(self) -> dict[str, Any]:
        # Nothing of our own to save: between two __next__ calls no dropped record is pending.
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "DropBadIterator"


class _EvalRow(grain.transforms.Map):
    """Eval keeps every position: a bad record becomes a masked blank row (so batch counts stay fixed)."""

    def __init__(self, image_size: int, context_length: int):
        self.image_size = image_size
        self.context_length = context_length

    def blank(self, num_skipped: int) -> dict[str, Any]:
        return {
            "image": np.zeros((self.image_size, self.image_size, 3), np.float32),
            "text": np.zeros((self.context_length,), np.int32),
            "label": np.int32(-1),
            "mask": np.bool_(False),
            "num_skipped": np.int32(num_skipped),
        }

    def map(self, element):
        if "_bad" in element:
            return self.blank(1)
        return {**element, "mask": np.bool_(True), "num_skipped": np.int32(0)}


class _Padding(grain.transforms.Map):
    def __init__(self, row: _EvalRow):
        self.row = row

    def map(self, element):
        del element
        return self.row.blank(0)


def _worker_init(*unused_args) -> None:
    # Worker processes are spawned fresh: absl flags (read by array_record) must be marked parsed there too.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  # only the main process needs JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def _tokenizer(cfg):
    return text_tokenizer.build_tokenizer(
        cfg.tokenizer, context_length=int(cfg.context_length), bpe_path=cfg.bpe_path or None
    )


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(cfg.read_threads), prefetch_buffer_size=int(cfg.prefetch))


def _maybe_workers(ds: grain.IterDataset, cfg) -> grain.IterDataset:
    if int(cfg.worker_count) > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(cfg.worker_count), per_worker_buffer_size=int(cfg.worker_buffer_size)
            ),
            worker_init_fn=_worker_init,
        )
    return ds


def make_train_loader(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """The training stream of this process: ``iter(loader)`` yields per-process batches

    ``{"image": float32 [b, s, s, 3] in [-1, 1], "text": int32 [b, t], "label": int32 [b], "num_skipped": int32 [b]}``
    with ``b = global_batch_size // process_count``; ``num_skipped[i]`` counts the bad records dropped just before
    row ``i`` (sum it for the batch). Same seed -> same batches; ``num_epochs=None`` repeats forever. The iterator
    supports ``iterator_state`` / ``restore_iterator`` and the Orbax args below; a state restores only into a loader
    built with the same files, seed, batch size, process count and worker_count (the state is per worker). With
    ``worker_count > 0`` call ``it.close()`` when done to stop the worker processes.
    """
    cfg = complete_data_config(data_config)
    validate_data_config(cfg)
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} must be in [0, 2**31)")
    local_batch_size = global_batch_size // process_count

    mixture = train_sources(cfg)
    components = []
    for i, (files, _) in enumerate(mixture):
        ds = grain.MapDataset.source(records.read_array_records(files))
        if len(ds) == 0:
            raise ValueError(f"training files {files[:3]}... hold no records")
        # Shuffle before repeat: the shuffle folds the epoch into its seed, so each epoch has a new order.
        ds = ds.shuffle(seed=(seed * 7919 + i) % 2**32).repeat(num_epochs)
        components.append(ds)
    if len(components) > 1:
        ds = grain.MapDataset.mix(components, [w for _, w in mixture])
    else:
        ds = components[0]
    ds = ds.map_with_index(
        _DecodeExample(
            train=True,
            seed=seed,
            image_size=int(cfg.image_size),
            scale=cfg.crop_scale,
            ratio=cfg.crop_ratio,
            tokenizer=_tokenizer(cfg),
        )
    )
    # Lazy map: slicing after it decodes only this process's share. All processes see the same global order.
    ds = ds[process_index::process_count]
    it_ds = _DropBadIterDataset(ds.to_iter_dataset(_read_options(cfg)))
    it_ds = it_ds.batch(local_batch_size, drop_remainder=True)
    return _maybe_workers(it_ds, cfg)


class EvalLoader:
    """A re-iterable, finite eval stream: every ``iter()`` starts at the beginning and yields ``len(self)`` batches

    ``{"image", "text", "label", "mask": bool [b], "num_skipped": int32 [b]}``; rows with ``mask == False`` are padding
    or undecodable records (the latter have ``num_skipped == 1``) and must be left out of metrics.
    """

    def __init__(self, dataset: grain.IterDataset, num_batches: int, num_examples: int, local_batch_size: int):
        self.dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # all processes together, bad records included
        self.local_batch_size = local_batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)


def make_eval_loader(
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    files: Sequence[str] | str | None = None,
) -> EvalLoader:
    """Deterministic single pass over the eval split (``files`` overrides it), no shuffle, no augmentation.

    ``batch_size`` is global (split evenly across processes). Process ``p`` takes records ``p, p + P, ...``; all
    processes yield the same number of batches, the last ones padded with ``mask == False`` rows.
    """
    cfg = complete_data_config(data_config)
    validate_data_config(cfg)
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
    local_batch_size = batch_size // process_count
    paths = eval_files(cfg) if files is None else sources.resolve_files(files, split="eval")
    ds = grain.MapDataset.source(records.read_array_records(paths))
    num_examples = len(ds)
    if num_examples == 0:
        raise ValueError(f"eval files {paths[:3]}... hold no records")
    row = _EvalRow(int(cfg.image_size), int(cfg.context_length))
    ds = ds.map_with_index(
        _DecodeExample(
            train=False,
            seed=0,
            image_size=int(cfg.image_size),
            scale=cfg.crop_scale,
            ratio=cfg.crop_ratio,
            tokenizer=_tokenizer(cfg),
        )
    ).map(row)
    ds = ds[process_index::process_count]
    per_process = -(-num_examples // process_count)
    num_batches = -(-per_process // local_batch_size)
    num_pad = num_batches * local_batch_size - len(ds)
    if num_pad:
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(num_pad).map(_Padding(row))])
    it_ds = ds.to_iter_dataset(_read_options(cfg)).batch(local_batch_size, drop_remainder=False)
    return EvalLoader(_maybe_workers(it_ds, cfg), num_batches, num_examples, local_batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Checkpointing the iterator.


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """JSON-serialisable state of a train iterator (``iter(make_train_loader(...))``)."""
    return it.get_state()


def restore_iterator(it: grain.DatasetIterator, state: Mapping[str, Any]) -> grain.DatasetIterator:
    """Puts ``it`` (a fresh iterator of an identically configured loader) at ``state``; returns it."""
    it.set_state(dict(state))
    return it


def local_next_index(it: grain.DatasetIterator) -> int:
    """How many elements of this process's slice (``ds[p::P]``) the train iterator has consumed, bad ones included."""
    state = it.get_state()
    if "next_index" not in state:
        raise ValueError(
            "the data position is defined for loaders with config.data.worker_count=0 only (Grain's "
            f"multiprocess state has no single index: {sorted(state)})"
        )
    return int(state["next_index"])


def global_position(local_next_indices: Sequence[int], global_batch_size: int) -> dict[str, Any]:
    """The topology-free data position saved with each checkpoint, from every process's ``local_next_index``.

    Process ``p`` of ``P`` reads global indices ``p, p + P, ...``; ``next_global_index`` is the smallest index any
    process has not consumed yet, so every example before it has been trained on. Without skipped bad records all
    processes have consumed the same count and it is exactly ``step * global_batch_size``; with skips a few
    examples after it may be seen twice after a resume on another process count (never one skipped).
    """
    count = len(local_next_indices)
    next_global = min(n * count + p for p, n in enumerate(local_next_indices))
    return {
        "next_global_index": int(next_global),
        "process_count": count,
        "local_next_indices": [int(n) for n in local_next_indices],
        "global_batch_size": int(global_batch_size),
    }


def restore_global_position(
    it: grain.DatasetIterator,
    position: Mapping[str, Any],
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> None:
    """Puts a fresh train iterator of this process at ``position`` (from ``global_position``), whatever process count
    wrote it: process ``p`` of ``P`` continues at the first index ``>= next_global_index`` of its slice ``p::P``."""
    process_index, process_count = _process_index_and_count(process_index, process_count)
    g = int(position["next_global_index"])
    state = it.get_state()
    if "next_index" not in state:
        raise ValueError(
            "resuming on another process count needs config.data.worker_count=0 (Grain's multiprocess "
            "iterator state is per worker)"
        )
    it.set_state({**state, "next_index": max(0, -(-(g - process_index) // process_count))})


def grain_checkpoint_handler() -> grain.checkpoint.CheckpointHandler:
    """The Orbax handler for the data item; register as ``item_handlers={CHECKPOINT_ITEM_NAME: this}``."""
    return grain.checkpoint.CheckpointHandler()


def grain_checkpoint_save_args(it: grain.DatasetIterator):
    """``ocp.args.Composite(**{CHECKPOINT_ITEM_NAME: grain_checkpoint_save_args(it)}, ...)`` saves the iterator."""
    return grain.checkpoint.CheckpointSave(it)


def grain_checkpoint_restore_args(it: grain.DatasetIterator):
    """Restores into ``it`` in place (each process reads its own ``process_<i>-of-<n>.json``)."""
    return grain.checkpoint.CheckpointRestore(it)

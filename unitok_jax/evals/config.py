"""`config.eval`: its defaults, their merge with what a config gives, and the data configs the evals read.

Every consumer (the `evaluate` CLI, the trainer's periodic evals, the colabs) completes `config.eval` here, once per
call, so the defaults live in one place.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
from absl import logging

from unitok_jax.data import pipeline

EVAL_NAMES = ("recon", "fid", "zeroshot")


def default_eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval`; a config without `eval` (or with only some fields) gets these."""
    return ml_collections.ConfigDict(
        dict(
            every_steps=0,  # training: run the evals every N steps (0 = never during training)
            at_end=True,  # training: also after the last step (when every_steps > 0)
            names="recon,fid,zeroshot",  # comma-separated (or a sequence) of EVAL_NAMES
            batch_size=0,  # global eval batch; 0 = config.eval_batch_size (rounded up to the device count)
            num_batches=0,  # 0 = the whole eval split
            grid_images=16,  # images in the [original | reconstruction] grid (0 = no grid)
            recon=dict(lpips_path=""),  # '' = config.loss.lpips_path; neither -> recon/lpips_skipped
            fid=dict(
                inception_path="",  # pt_inception-2015-12-05-6726825d.pth; '' -> fid/skipped
                reference_stats="",  # .npz cache of the originals' statistics ('' = recompute every time)
                resize_mode="pytorch_fid",  # or 'torch_fidelity' (UniTok's numbers)
                compute_is=True,
                is_splits=10,
            ),
            zeroshot=dict(
                data_files="",  # '' = the eval split of config.data; else ArrayRecord glob/dir/manifest
                class_names="",  # '' = embedded / manifest class_names; 'imagenet'; a .txt path; 'a,b,c'
                templates="",  # '' = auto (embedded prompts / 80 OpenAI templates for imagenet / 'a photo
                # of a {}.'); 'openai'; 'simple'; a .txt path; 'a {}.|a photo of a {}.'
                batch_classes=10,
                retrieval=True,  # image<->text recall@1/5/10 on the same batches (captions from the records)
                retrieval_max=5000,  # retrieval uses at most this many (image, caption) pairs
            ),
        )
    )


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, prefix: str) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            logging.warning("config.%s%s is not a known eval field (known: %s); ignored", prefix, key, sorted(defaults))
            continue
        if isinstance(defaults[key], Mapping):
            out[key] = _merge(defaults[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def eval_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """`config.eval` completed with `default_eval_config()` (missing fields -> defaults)."""
    given = None
    if config is not None and "eval" in config and config.eval is not None:
        given = config.eval.to_dict() if isinstance(config.eval, ml_collections.ConfigDict) else dict(config.eval)
    return ml_collections.ConfigDict(_merge(default_eval_config().to_dict(), given, "eval."))


def parse_names(names: str | Sequence[str] | None) -> list[str]:
    """EVAL_NAMES from 'recon,fid' or a sequence, de-duplicated in the given order; unknown names raise."""
    if names is None:
        return list(EVAL_NAMES)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    out = []
    for n in names:
        if not n:
            continue
        if n not in EVAL_NAMES:
            raise ValueError(f"unknown eval {n!r}; available: {list(EVAL_NAMES)}")
        if n not in out:
            out.append(n)
    return out


def evals_due(config: ml_collections.ConfigDict | None, step: int) -> bool:
    """Cheap check (no I/O): are the periodic evals due after training step `step`?"""
    ev = config.get("eval") if config is not None else None
    every = int(ev.get("every_steps", 0) or 0) if ev is not None else 0
    if every <= 0:
        return False
    at_end = bool(ev.get("at_end", True))
    return step % every == 0 or (at_end and step == int(config.total_steps))


def eval_batch_size(config, ec, mesh) -> int:
    """The global eval batch, rounded up so every process and every data-parallel device gets whole rows."""
    bs = int(ec.batch_size) or int(config.get("eval_batch_size", 16) or 16)
    multiple = jax.process_count()
    if mesh is not None:
        multiple = math.lcm(multiple, int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1)))
    return -(-bs // multiple) * multiple


def data_config_for(config, files: str = "") -> ml_collections.ConfigDict:
    """`config.data` completed with the pipeline defaults; with `files`, an ArrayRecord dataset of those files
    instead (the zero-shot eval on another dataset)."""
    cfg = pipeline.complete_data_config(config.data)
    if files:
        cfg.name = "array_record"
        cfg.eval_files = files
        if not cfg.train_files:
            cfg.train_files = files
        cfg.sources = []
    return cfg


def limited(loader: Iterable, num_batches: int) -> Iterator:
    """The first `num_batches` batches of `loader` (all of them when 0)."""
    for i, batch in enumerate(loader):
        if num_batches and i >= num_batches:
            break
        yield batch

"""Metric and image writers: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), PNG grids, progress line.

Only process 0 writes. An I/O error (full disk, read-only mount, ...) never stops training: it is logged once
per writer and counted in `errors`, and writing is retried on the next call. The workdir may be local or on an
object store (`gs://`, see `unitok_jax.paths`): TensorBoard events are then written to a local staging directory
and uploaded on every flush (tensorboardX appends to an open file, which object stores cannot do).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging

from unitok_jax import paths
from unitok_jax.image_grid import save_pair_grid


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
    def __init__(
        self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None, resume_step: int | None = None
    ):
        """`resume_step`: the step a resumed run restarts from; rows of later steps (written by an attempt that was
        killed before its next checkpoint, and about to be recomputed) are dropped from metrics.jsonl, so it keeps
        one row per step."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = paths.resolve(workdir)
        self.jsonl_path = paths.join(self.workdir, "metrics.jsonl")
        self.errors = 0
        self._reported: set[str] = set()
        self._tb = None
        self._tb_remote = self._tb_local = None
        self._jsonl_cache: str | None = None  # object stores: the whole file (they cannot append)
        if self.enabled and resume_step is not None:
            self._guard("metrics.jsonl", self._drop_rows_after, int(resume_step))
        if self.enabled and tensorboard:
            self._guard("tensorboard", self._open_tensorboard)

    def _open_tensorboard(self):
        from tensorboardX import SummaryWriter

        target = paths.join(self.workdir, "tensorboard")
        if paths.is_url(target):
            self._tb_remote = target
            self._tb_local = paths.makedirs(
                paths.join("~/.cache/unitok_jax/tensorboard", hashlib.sha256(target.encode()).hexdigest()[:16])
            )
            target = self._tb_local
        self._tb = SummaryWriter(target, flush_secs=10)

    def _upload_tensorboard(self):
        if self._tb_remote is None:
            return
        for name in paths.listdir(self._tb_local):
            paths.write_bytes_atomic(
                paths.join(self._tb_remote, name), paths.read_bytes(paths.join(self._tb_local, name))
            )

    def _drop_rows_after(self, step: int):
        if not paths.exists(self.jsonl_path):
            return
        lines = paths.read_text(self.jsonl_path).splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) != len(lines):
            paths.write_text_atomic(self.jsonl_path, "".join(kept))
            logging.info(
                "metrics.jsonl: dropped %d row(s) after step %d (recomputed on resume)", len(lines) - len(kept), step
            )

    def _guard(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (OSError, ValueError) as e:
            self.errors += 1
            if what not in self._reported:
                self._reported.add(what)
                logging.error("writing %s failed (%s: %s); training continues, will retry", what, type(e).__name__, e)
            return None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in sorted(scalars.items())}}
        self._guard("metrics.jsonl", self._append_jsonl, record)
        if self._tb is not None:
            self._guard("tensorboard", self._write_tb, step, record)

    def _append_jsonl(self, record):
        line = json.dumps(record, allow_nan=True) + "\n"
        if not paths.is_url(self.jsonl_path):
            paths.append_text(self.jsonl_path, line)
            return
        if self._jsonl_cache is None:
            self._jsonl_cache = paths.read_text(self.jsonl_path) if paths.exists(self.jsonl_path) else ""
        paths.write_text_atomic(self.jsonl_path, self._jsonl_cache + line)
        self._jsonl_cache += line

    def _write_tb(self, step, record):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def write_image_grid(self, step: int, name: str, originals: np.ndarray, reconstructions: np.ndarray) -> str | None:
        """Save a PNG whose rows are [original | reconstruction] pairs; images NHWC in [-1, 1]."""
        if not self.enabled:
            return None
        path = paths.join(self.workdir, "images", f"{name}_step{int(step):07d}.png")
        return self._guard("images", save_pair_grid, path, originals, reconstructions)

    def flush(self):
        if self._tb is not None:
            self._guard("tensorboard", self._tb.flush)
            self._guard("tensorboard", self._upload_tensorboard)

    def close(self):
        if self._tb is not None:
            self._guard("tensorboard", self._tb.close)
            self._guard("tensorboard", self._upload_tensorboard)
            self._tb = None


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn or foreign line: kept (never counted as a later step)


class ProgressLine:
    """One log line per logging step: step, main losses, images/s and ETA."""

    KEYS = (
        "train/loss/total",
        "train/loss/l2",
        "train/loss/clip",
        "train/loss/vq",
        "train/loss/d",
        "train/codebook/usage",
    )

    def __init__(self, total_steps: int, start_step: int, clock=time.time):
        self.total_steps = total_steps
        self.start_step = start_step
        self.clock = clock
        self.first: tuple[float, int] | None = None  # (time, step) of the first line

    def format(self, step: int, scalars: Mapping[str, float]) -> str:
        # The ETA is timed from the first logged step on: the first step also pays one-off costs (the first
        # execution, the input pipeline's warm-up), which would inflate it for the whole run.
        now = self.clock()
        if self.first is None:
            self.first = (now, step)
        first_time, first_step = self.first
        eta = (now - first_time) / (step - first_step) * (self.total_steps - step) if step > first_step else None
        parts = [f"step {step}/{self.total_steps}"]
        for key in self.KEYS:
            if key in scalars:
                parts.append(f"{key.split('/')[-1]}={float(scalars[key]):.4f}")
        if "perf/images_per_sec" in scalars:
            parts.append(f"img/s={float(scalars['perf/images_per_sec']):.1f}")
        parts.append(f"eta={_hms(eta) if eta is not None else '…'}")
        return " | ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_progress(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stdout, flush=True)

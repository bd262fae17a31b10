"""Metric and image writers: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), PNG grids, progress line.

Only process 0 writes. An I/O error (full disk, read-only mount, ...) never stops training: it is logged once
per writer and counted in `errors`, and writing is retried on the next call.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging
from PIL import Image


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.errors = 0
        self._reported: set[str] = set()
        self._tb = None
        if self.enabled and tensorboard:
            self._guard("tensorboard", self._open_tensorboard)

    def _open_tensorboard(self):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), flush_secs=10)

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
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def _write_tb(self, step, record):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def write_image_grid(self, step: int, name: str, originals: np.ndarray, reconstructions: np.ndarray) -> str | None:
        """Save a PNG whose rows are [original | reconstruction] pairs; images NHWC in [-1, 1]."""
        if not self.enabled:
            return None
        path = os.path.join(self.workdir, "images", f"{name}_step{int(step):07d}.png")
        return self._guard("images", _save_pair_grid, path, originals, reconstructions)

    def flush(self):
        if self._tb is not None:
            self._guard("tensorboard", self._tb.flush)

    def close(self):
        if self._tb is not None:
            self._guard("tensorboard", self._tb.close)
            self._tb = None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float → uint8 with round((x + 1)·127.5), clamped (the official convention)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _save_pair_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray) -> str:
    pairs = np.concatenate([to_uint8(originals), to_uint8(reconstructions)], axis=2)  # [b, h, 2w, 3]
    b, h, w2, c = pairs.shape
    cols = max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / cols))
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w2 + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w2 + pad): pad + col * (w2 + pad) + w2] = pairs[i]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class ProgressLine:
    """One log line per logging step: step, main losses, images/s and ETA."""

    KEYS = ("train/loss/total", "train/loss/l2", "train/loss/clip", "train/loss/vq", "train/loss/d", "train/codebook/usage")

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()

    def format(self, step: int, scalars: Mapping[str, float]) -> str:
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for key in self.KEYS:
            if key in scalars:
                parts.append(f"{key.split('/')[-1]}={float(scalars[key]):.4f}")
        if "perf/images_per_sec" in scalars:
            parts.append(f"img/s={float(scalars['perf/images_per_sec']):.1f}")
        parts.append(f"eta={_hms(eta)}")
        return " | ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_progress(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stdout, flush=True)

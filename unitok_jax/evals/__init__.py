"""Evaluation: metrics (PSNR/SSIM, FID/IS with the TF-2015 InceptionV3, zero-shot, codebook usage) and `run_evals`.

Below the training code (nothing here imports `unitok_jax.train`; the trainer's periodic evals live in
`train/periodic_evals.py`). Submodules are imported explicitly (`from unitok_jax.evals import fid`); this file only
holds the cross-process helpers they share.

    image_metrics   psnr, ssim, to_unit_range
    inception       FidInceptionV3 (pytorch-fid / torch-fidelity port), load_fid_inception
    fid             frechet_distance, FeatureStats, inception_score, FidEvaluator
    zeroshot        build_classifier, zero_shot_logits, topk_accuracy, recall_at_k
    codebook        CodebookUsage
    config          config.eval defaults and merge, EVAL_NAMES, evals_due
    accumulators    one per eval: update(batch, out, mask) / finalize()
    forward         the jitted eval forward of a tokenizer
    eval_networks   InceptionV3 and LPIPS from user paths, cached per process
    zeroshot_setup  class names, templates and the text classifier a config asks for
    runner          run_evals, summary_line, write_report
"""

from __future__ import annotations

import numpy as np


def _split_f64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 -> (hi, lo) float32 pair with hi + lo == x to ~48 mantissa bits (integers exact below 2**48)."""
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    return hi, lo


def gather_across_processes(x) -> np.ndarray:
    """Stack a host-local numpy array from every JAX process: [process_count, *x.shape], float64-exact-ish.

    `process_allgather` goes through jax arrays, which are float32/int32 unless x64 is enabled, so the values
    are sent as a float32 hi/lo pair and recombined in float64 (~48 mantissa bits; integers exact below 2**48).
    Every process must call this with the same shape (collective). On one process: x[None], no communication.
    """
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None].copy()
    from jax.experimental import multihost_utils

    hi, lo = _split_f64(x.astype(np.float64))
    hi_all = np.asarray(multihost_utils.process_allgather(hi), np.float64)  # [p, ...]
    lo_all = np.asarray(multihost_utils.process_allgather(lo), np.float64)
    total = hi_all + lo_all
    if np.issubdtype(x.dtype, np.integer):
        return np.rint(total).astype(x.dtype)
    return total.astype(x.dtype)


def sum_across_processes(x) -> np.ndarray:
    """Sum a host-local numpy array over all JAX processes keeping float64 precision (collective)."""
    x = np.asarray(x)
    return gather_across_processes(x).sum(axis=0).astype(x.dtype)


def concat_across_processes(x) -> np.ndarray:
    """Concatenate host-local float arrays [n_p, ...] from all processes along axis 0 (identity on one process).

    Row counts may differ per process: the counts are gathered first and each block is zero-padded to the max.
    """
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x.copy()
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int32))).reshape(-1)
    pad = int(counts.max()) - x.shape[0]
    padded = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)], axis=0) if pad else x
    gathered = np.asarray(multihost_utils.process_allgather(padded.astype(np.float32)))  # [p, max_n, ...]
    return np.concatenate([gathered[i, : counts[i]] for i in range(len(counts))], axis=0).astype(x.dtype)


def local_rows(x) -> np.ndarray:
    """Host-local rows of a batch: numpy as is; a jax.Array spanning processes -> its addressable row blocks."""
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    blocks = {}
    for shard in x.addressable_shards:  # replicas of the same rows appear once
        start = (shard.index[0].start or 0) if shard.index else 0
        blocks.setdefault(start, np.asarray(shard.data))
    return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)

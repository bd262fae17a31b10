"""Codebook utilisation over a whole eval set: per-codebook code counts [k, K] accumulated over batches and hosts.

Reported per codebook (and averaged over the k codebooks, as UniTok averages its 8 sub-codebooks):
  * usage           fraction of the K entries used at least once;
  * usage_official  fraction of entries whose frequency p_j > 0.01 / K — UniTok's training metric
                    (`models/quant.py`: 100 * mean(p > 0.01/K), logged in percent and measured per batch;
                    here it is a fraction in [0, 1] over the whole eval set);
  * perplexity      exp(H(p)), H in nats: K for uniform use, 1 for a single code.
Flat keys: 'usage', 'usage_official', 'perplexity', 'num_tokens', 'usage/cb{i}', 'usage_official/cb{i}',
'perplexity/cb{i}'. Index layouts: UniTok `f_to_idx` gives [b, k, n] (codebook_axis=1); TokenFlow's shared
index space is one codebook ([b, n], codebook_axis=None, num_codebooks=1).
Not here: the training-time EMA usage buffer (models/quantizers).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.evals import sum_across_processes


def _to_codebook_major(indices, num_codebooks: int, codebook_axis: int | None, xp):
    if codebook_axis is None:
        if num_codebooks != 1:
            raise ValueError("codebook_axis=None means a single codebook; set num_codebooks=1")
        return indices.reshape(1, -1)
    if indices.shape[codebook_axis] != num_codebooks:
        raise ValueError(
            f"indices of shape {tuple(indices.shape)} have {indices.shape[codebook_axis]} codebooks on axis "
            f"{codebook_axis}, expected {num_codebooks}"
        )
    return xp.moveaxis(indices, codebook_axis, 0).reshape(num_codebooks, -1)


def batch_code_counts(
    indices: jax.Array, num_codebooks: int, codebook_size: int, *, codebook_axis: int | None = 1
) -> jax.Array:
    """Per-codebook histogram [k, K] int32 of a batch of code indices (jit-able; out-of-range indices dropped)."""
    idx = _to_codebook_major(jnp.asarray(indices).astype(jnp.int32), num_codebooks, codebook_axis, jnp)
    valid = (idx >= 0) & (idx < codebook_size)
    flat = jnp.where(valid, idx + codebook_size * jnp.arange(num_codebooks, dtype=jnp.int32)[:, None], -1)
    counts = jnp.zeros((num_codebooks * codebook_size,), jnp.int32)
    counts = counts.at[flat.reshape(-1)].add(valid.reshape(-1).astype(jnp.int32), mode="drop")
    return counts.reshape(num_codebooks, codebook_size)


def usage_fraction(counts) -> np.ndarray:
    """[k, K] counts -> [k] fraction of entries used at least once."""
    return (np.asarray(counts) > 0).mean(axis=-1)


def official_usage(counts) -> np.ndarray:
    """[k, K] counts -> [k] fraction of entries with frequency > 0.01 / K (UniTok's metric, as a fraction)."""
    counts = np.asarray(counts, np.float64)
    k_size = counts.shape[-1]
    total = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    return (p > 0.01 / k_size).mean(axis=-1)


def perplexity(counts) -> np.ndarray:
    """[k, K] counts -> [k] exp(entropy in nats) of each code distribution (nan for an empty codebook)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    out = np.exp(-plogp.sum(axis=-1))
    return np.where(total[..., 0] > 0, out, np.nan)


def codebook_summary(counts, prefix: str = "") -> dict[str, float]:
    """Flat metrics dict from [k, K] counts (see module doc); `prefix` e.g. 'eval/codebook/'."""
    counts = np.asarray(counts)
    if counts.ndim == 1:
        counts = counts[None]
    use, off, ppl = usage_fraction(counts), official_usage(counts), perplexity(counts)
    out = {
        f"{prefix}usage": float(use.mean()),
        f"{prefix}usage_official": float(off.mean()),
        f"{prefix}perplexity": float(np.nanmean(ppl)) if np.isfinite(ppl).any() else math.nan,
        f"{prefix}num_tokens": int(counts[0].sum()),
    }
    for i in range(counts.shape[0]):
        out[f"{prefix}usage/cb{i}"] = float(use[i])
        out[f"{prefix}usage_official/cb{i}"] = float(off[i])
        out[f"{prefix}perplexity/cb{i}"] = float(ppl[i])
    return out


class CodebookUsage:
    """Accumulates code counts [k, K] (int64, host) over an eval set; `compute` sums over processes (collective).

    usage = CodebookUsage(num_codebooks=8, codebook_size=4096)       # UniTok: indices [b, 8, n]
    for batch in data: usage.update(aux['indices'])                 # or update_counts(batch_code_counts(...))
    metrics = usage.compute(prefix='eval/codebook/')
    """

    def __init__(self, num_codebooks: int, codebook_size: int, *, codebook_axis: int | None = 1):
        self.num_codebooks = int(num_codebooks)
        self.codebook_size = int(codebook_size)
        self.codebook_axis = codebook_axis
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros((self.num_codebooks, self.codebook_size), np.int64)

    def update(self, indices) -> None:
        """Count a batch of host-local indices (numpy or a fully addressable jax array). Raises on out-of-range."""
        idx = np.asarray(indices).astype(np.int64)
        idx = _to_codebook_major(idx, self.num_codebooks, self.codebook_axis, np)
        if idx.size and (idx.min() < 0 or idx.max() >= self.codebook_size):
            raise ValueError(f"code indices out of range [0, {self.codebook_size}): min {idx.min()}, max {idx.max()}")
        flat = idx + self.codebook_size * np.arange(self.num_codebooks)[:, None]
        self.counts += np.bincount(flat.reshape(-1), minlength=self.counts.size).reshape(self.counts.shape)

    def update_counts(self, counts) -> None:
        """Add a precomputed histogram [k, K] (e.g. `batch_code_counts` on device, already summed over devices)."""
        counts = np.asarray(counts, np.int64)
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts shape {counts.shape} != {self.counts.shape}")
        self.counts += counts

    def merge(self, other: "CodebookUsage") -> "CodebookUsage":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge {other.counts.shape} counts into {self.counts.shape}")
        out = CodebookUsage(self.num_codebooks, self.codebook_size, codebook_axis=self.codebook_axis)
        out.counts = self.counts + other.counts
        return out

    def allreduce(self) -> np.ndarray:
        """Counts summed over all JAX processes (collective)."""
        return sum_across_processes(self.counts)

    def compute(self, prefix: str = "") -> dict[str, float]:
        return codebook_summary(self.allreduce(), prefix=prefix)

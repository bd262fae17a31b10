"""FID and Inception Score: float64 Frechet distance, streaming feature statistics, cached reference stats.

Maths on the host in float64 (numpy; `scipy.linalg.sqrtm` for pytorch-fid's formula):
  * `frechet_distance` = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). The trace term is computed as
    sum sqrt(eig(L^T S2 L)) with S1 = L L^T (or sqrt(S1) S2 sqrt(S1) when S1 is singular) — a symmetric PSD
    matrix similar to S1 S2 — which is exact, needs only symmetric eigenvalue problems, and stays accurate for
    singular covariances (fewer samples than dimensions). `method='sqrtm'` instead mirrors pytorch-fid
    literally (`scipy.linalg.sqrtm(S1 @ S2)`, the eps * I offset retried when that is not finite, real part
    kept when the imaginary part is negligible, ValueError when it is not).
  * `FeatureStats` accumulates (count, mean, centred scatter) in float64 with the pairwise (Chan et al.)
    update, merges across batches and processes (`allreduce`, via `process_allgather`), and yields mu and the
    unbiased covariance (np.cov).
  * `ReferenceStats` is cached as .npz (mu, sigma, count, fingerprint); pytorch-fid/ADM .npz files with only
    mu/sigma load too.
  * `inception_score` follows torch-fidelity: softmax over all 1008 logits (by default the bias-free
    'logits_unbiased'), 10 splits of N // 10 (i*N//splits boundaries), optional seeded shuffle, mean and
    population std of exp(E KL(p(y|x) || p(y))).
`FidEvaluator` ties these to the InceptionV3 (evals/inception.py); without a weights path it reports
{'skipped': ...} instead of failing. Not here: image pre-processing (inception.preprocess), data loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Callable, Mapping

import numpy as np
import scipy.linalg

from unitok_jax import paths

from unitok_jax.evals import concat_across_processes, gather_across_processes, local_rows

SKIP_NO_WEIGHTS = "no InceptionV3 weights: set eval.fid.inception_path to pt_inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------- sqrtm


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (float64, eigh; tiny negative eigenvalues -> 0)."""
    a = np.asarray(a, np.float64)
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal square root of a square matrix: `scipy.linalg.sqrtm` in float64 (what pytorch-fid calls).

    A non-finite input gives an all-NaN result (the caller retries with an eps * I offset, like pytorch-fid).
    The result is real when its imaginary part is negligible (<= 1e-10 of the real part; scipy < 1.16 returns
    complex more often), complex otherwise (e.g. clearly negative eigenvalues).
    """
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"sqrtm expects a square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        return np.full(a.shape, np.nan)
    x = scipy.linalg.sqrtm(a)
    if np.iscomplexobj(x) and np.abs(x.imag).max() <= 1e-10 * max(np.abs(x.real).max(), 1e-300):
        x = x.real
    return x


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2, from the eigenvalues of a symmetric matrix similar to S1 S2.

    S1 positive definite: S1 = L L^T (Cholesky) and L^T S2 L ~ S1 S2 (cheap: no eigenvectors needed).
    Otherwise (singular S1, e.g. fewer samples than dimensions): sqrt(S1) S2 sqrt(S1) ~ S1 S2 via eigh.
    Tiny negative eigenvalues from rounding are clamped to 0.
    """
    s1 = np.asarray(sigma1, np.float64)
    s2 = np.asarray(sigma2, np.float64)
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    try:
        r = np.linalg.cholesky(s1)
        m = r.T @ s2 @ r
    except np.linalg.LinAlgError:
        r = sqrtm_psd(s1)
        m = r @ s2 @ r
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.maximum(w, 0.0)).sum())


# ----------------------------------------------------------------------------------------------- FID


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    eps: float = 1e-6,
    method: str = "eigh",
) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2), float64.

    method='eigh' (default): trace term from the symmetric product (robust, see module doc).
    method='sqrtm': pytorch-fid's `calculate_frechet_distance` (sqrtm of the non-symmetric product; when it is
    not finite, retry with eps * I added to both covariances; ValueError if the imaginary part exceeds 1e-3).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = trace_sqrt_product(s1, s2)
        if not np.isfinite(tr_covmean):
            offset = np.eye(s1.shape[0]) * eps
            tr_covmean = trace_sqrt_product(s1 + offset, s2 + offset)
    elif method == "sqrtm":
        covmean = sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(
                    f"sqrtm(S1 S2) is not real: imaginary parts up to {np.max(np.abs(covmean.imag))} (pytorch-fid "
                    "allows 1e-3 on the diagonal); are both covariances symmetric positive semi-definite?"
                )
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"unknown method {method!r}; available: ['eigh', 'sqrtm']")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64: count, mean [d], centred scatter M2 [d, d].

    Batches and partial statistics combine with the pairwise update of Chan et al. (M2 = M2a + M2b +
    delta delta^T na nb / n), which, unlike raw sums of x x^T, does not cancel catastrophically when the
    mean is large relative to the spread. `update` per batch (host-local rows), `merge` partial stats,
    `allreduce` across JAX processes (collective, via `process_allgather`), then `mean` / `covariance`
    (unbiased, like np.cov(rowvar=False) in pytorch-fid).
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros((self.dim,), np.float64)
        self.m2 = np.zeros((self.dim, self.dim), np.float64)

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        n = self.count + count
        delta = mean - self._mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / n)
        self._mean = self._mean + delta * (count / n)
        self.count = n

    def update(self, features) -> "FeatureStats":
        f = np.asarray(local_rows(features), np.float64)
        if f.ndim < 1 or f.shape[-1] != self.dim:
            raise ValueError(f"feature dim {f.shape[-1] if f.ndim else None} != {self.dim}")
        f = f.reshape(-1, self.dim)
        if f.shape[0]:
            mean = f.mean(axis=0)
            c = f - mean
            self._combine(f.shape[0], mean, c.T @ c)
        return self

    def update_sums(self, count: int, total, outer) -> "FeatureStats":
        """Add precomputed raw partial sums (e.g. reduced on device): count, sum [d], sum of x x^T [d, d]."""
        count = int(count)
        if count:
            mean = np.asarray(total, np.float64).reshape(self.dim) / count
            m2 = np.asarray(outer, np.float64).reshape(self.dim, self.dim) - count * np.outer(mean, mean)
            self._combine(count, mean, m2)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """A new FeatureStats holding both (associative up to float64 rounding)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {self.dim} and {other.dim}")
        out = self.copy()
        out._combine(other.count, other._mean, other.m2)
        return out

    def copy(self) -> "FeatureStats":
        out = FeatureStats(self.dim)
        out.count, out._mean, out.m2 = self.count, self._mean.copy(), self.m2.copy()
        return out

    def allreduce(self) -> "FeatureStats":
        """Combine the per-process statistics of all JAX processes, in process order (collective)."""
        counts = gather_across_processes(np.asarray([self.count], np.int64))[:, 0]
        means = gather_across_processes(self._mean)
        m2s = gather_across_processes(self.m2)
        out = FeatureStats(self.dim)
        for count, mean, m2 in zip(counts, means, m2s):
            out._combine(int(count), mean, m2)
        return out

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        cov = self.m2 / (self.count - 1)
        return 0.5 * (cov + cov.T)

    def to_reference(self, fingerprint: str = "") -> "ReferenceStats":
        return ReferenceStats(mu=self.mean(), sigma=self.covariance(), count=self.count, fingerprint=fingerprint)


def source_fingerprint(**description: Any) -> str:
    """A stable sha256 hex of a description of where statistics came from (dataset, split, resolution,
    pre-processing, number of images, weights digest, ...): cached reference stats are reused only if equal."""
    blob = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file (the pytorch-fid weights are named after the first 8 hex digits: ...-6726825d.pth)."""
    h = hashlib.sha256()
    with paths.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class ReferenceStats:
    """Gaussian statistics of a reference set, cached as .npz with keys mu, sigma, count, fingerprint."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0
    fingerprint: str = ""

    def save(self, path: str | os.PathLike) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mu=np.asarray(self.mu, np.float64),
            sigma=np.asarray(self.sigma, np.float64),
            count=np.asarray(self.count, np.int64),
            fingerprint=np.asarray(self.fingerprint),
        )
        paths.write_bytes_atomic(path, buffer.getvalue())  # atomic: a crash never leaves a half-written cache

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_fingerprint: str | None = None) -> "ReferenceStats":
        """Load a cache; a mismatching `expected_fingerprint` raises (stale statistics are never used silently).

        Files with only mu/sigma (pytorch-fid `--save-stats`, ADM reference batches) load with count 0 and an
        empty fingerprint; those cannot satisfy an `expected_fingerprint`.
        """
        path = os.fspath(path)
        if not paths.exists(path):
            raise FileNotFoundError(f"reference statistics not found: {path}")
        with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(data.keys())})")
            stats = cls(
                mu=np.asarray(data["mu"], np.float64),
                sigma=np.asarray(data["sigma"], np.float64),
                count=int(data["count"]) if "count" in data else 0,
                fingerprint=str(data["fingerprint"]) if "fingerprint" in data else "",
            )
        if stats.sigma.shape != (stats.mu.size, stats.mu.size):
            raise ValueError(f"{path}: sigma {stats.sigma.shape} does not match mu {stats.mu.shape}")
        if expected_fingerprint is not None and stats.fingerprint != expected_fingerprint:
            raise ValueError(
                f"reference statistics {path} were computed from a different source "
                f"(fingerprint {stats.fingerprint or '<none>'} != expected {expected_fingerprint}); "
                "delete the file to recompute"
            )
        return stats


# ----------------------------------------------------------------------------------------------- IS


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10, *, shuffle: bool = False, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from logits [N, C], float64 (torch-fidelity convention).

    Split i holds rows [i*N//splits, (i+1)*N//splits); IS_i = exp(mean_x KL(p(y|x) || mean_x p(y|x))).
    `shuffle=True` permutes rows with np.random.RandomState(seed) first (torch-fidelity: samples_shuffle=True,
    rng_seed=2020 by default). Pass the bias-free 'logits_unbiased' for torch-fidelity / OpenAI numbers.
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be [N, C], got {x.shape}")
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, have {n}")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    log_p = _log_softmax(x)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        q = p_chunk.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: classes with p(y|x) == 0 everywhere in the chunk (underflow) contribute nothing.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p_chunk > 0, p_chunk * (log_p_chunk - np.log(q)), 0.0)
        kl = terms.sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------- evaluator


class FidEvaluator:
    """rFID / gFID and IS over an eval set, streaming, multi-host.

        ev = FidEvaluator(cfg.eval.fid.inception_path, cfg.eval.fid.reference_stats_path)
        for batch in data:                         # every process, its own (or a global sharded) batch
            ev.update(recon_01, reference_images=orig_01)   # images NHWC in [0, 1]
        metrics = ev.compute()                     # collective; {'fid', 'inception_score', ...} or {'skipped'}

    Reference statistics: loaded from `reference_stats_path` if that file exists (checked against
    `reference_fingerprint` when given); otherwise accumulated from `reference_images` and, on process 0,
    written there for reuse. Without either, 'fid' is replaced by 'fid_skipped'.
    `inception_path` may also be a {key: array} state dict; `feature_fn(images) -> {'pool3', 'logits_unbiased'}`
    replaces the network entirely (tests, other feature extractors).
    """

    def __init__(
        self,
        inception_path: str | os.PathLike | Mapping[str, Any] | None,
        reference_stats_path: str | os.PathLike | None = None,
        *,
        resize_mode: str = "pytorch_fid",
        compute_is: bool = True,
        is_splits: int = 10,
        is_shuffle: bool = True,
        is_seed: int = 2020,
        reference_fingerprint: str | None = None,
        feature_fn: Callable[[Any], Mapping[str, Any]] | None = None,
        feature_dim: int = 2048,
    ):
        self.reference_stats_path = os.fspath(reference_stats_path) if reference_stats_path else None
        self.resize_mode = resize_mode
        self.compute_is = compute_is
        self.is_splits, self.is_shuffle, self.is_seed = is_splits, is_shuffle, is_seed
        self.reference_fingerprint = reference_fingerprint
        self.feature_dim = feature_dim
        self._forward = None
        self._pad_to = None
        if feature_fn is not None:
            self._forward = lambda x: _pool3_and_logits(feature_fn(x))
        elif inception_path is not None:
            self._forward = self._build_inception_forward(inception_path, resize_mode)
        self.reference: ReferenceStats | None = None
        if self.available and self.reference_stats_path and paths.exists(self.reference_stats_path):
            self.reference = ReferenceStats.load(self.reference_stats_path, expected_fingerprint=reference_fingerprint)
        self.reset()

    @property
    def available(self) -> bool:
        return self._forward is not None

    @staticmethod
    def _build_inception_forward(inception_path, resize_mode):
        import jax
        from flax import nnx

        from unitok_jax.evals.inception import load_fid_inception

        model = load_fid_inception(inception_path, resize_mode=resize_mode)
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, images):
            out = nnx.merge(graphdef, state)(images)
            return out["pool3"], out["logits_unbiased"]

        return lambda images: forward(state, images)

    def reset(self) -> None:
        """Forget accumulated features (the loaded reference statistics are kept)."""
        self.stats = FeatureStats(self.feature_dim)
        self.reference_accum = FeatureStats(self.feature_dim)
        self._logits: list[np.ndarray] = []

    def _features(self, images) -> tuple[np.ndarray, np.ndarray]:
        n = None
        if isinstance(images, np.ndarray):
            # Host batches: pad a short last batch to the first batch size so the jitted network is reused.
            n = images.shape[0]
            if self._pad_to is None:
                self._pad_to = n
            if n < self._pad_to:
                pad = np.zeros((self._pad_to - n,) + images.shape[1:], images.dtype)
                images = np.concatenate([images, pad], axis=0)
        pool3, logits = self._forward(images)
        pool3, logits = local_rows(pool3), local_rows(logits)
        if n is not None:
            pool3, logits = pool3[:n], logits[:n]
        return np.asarray(pool3, np.float64), np.asarray(logits, np.float32)

    def update(self, images, reference_images=None) -> None:
        """Accumulate a batch of generated / reconstructed images (NHWC in [0, 1]) and optionally its references."""
        if not self.available:
            return
        if (
            reference_images is not None
            and self.reference is None
            and isinstance(images, np.ndarray)
            and isinstance(reference_images, np.ndarray)
            and images.shape == reference_images.shape
        ):
            # One network call for both halves (host batches): half the dispatches, one compiled shape.
            n = images.shape[0]
            pool3, logits = self._features(np.concatenate([images, reference_images], axis=0))
            self.reference_accum.update(pool3[n:])
            pool3, logits = pool3[:n], logits[:n]
            reference_images = None
        else:
            pool3, logits = self._features(images)
        self.stats.update(pool3)
        if self.compute_is:
            self._logits.append(logits)
        if reference_images is not None:
            self.update_reference(reference_images)

    def update_reference(self, images) -> None:
        """Accumulate reference images (ignored when cached reference statistics were loaded)."""
        if not self.available or self.reference is not None:
            return
        pool3, _ = self._features(images)
        self.reference_accum.update(pool3)

    def compute(self) -> dict[str, Any]:
        """Collective over processes. Returns {'fid', 'inception_score', 'inception_score_std', 'num_images',
        'num_reference'} (as available) or {'skipped': reason}."""
        if not self.available:
            return {"skipped": SKIP_NO_WEIGHTS}
        import jax

        stats = self.stats.allreduce()
        out: dict[str, Any] = {"num_images": stats.count}
        reference = self.reference
        if reference is None:
            accum = self.reference_accum.allreduce()
            if accum.count >= 2:
                reference = accum.to_reference(self.reference_fingerprint or "")
                if self.reference_stats_path and jax.process_index() == 0:
                    reference.save(self.reference_stats_path)
        if reference is None:
            out["fid_skipped"] = "no reference statistics: pass reference_images or a reference_stats_path file"
        elif stats.count < 2:
            out["fid_skipped"] = f"only {stats.count} images accumulated"
        else:
            out["fid"] = frechet_distance(stats.mean(), stats.covariance(), reference.mu, reference.sigma)
            out["num_reference"] = reference.count
        if self.compute_is:
            local = np.concatenate(self._logits, axis=0) if self._logits else np.zeros((0, 1), np.float32)
            logits = concat_across_processes(local)
            if logits.shape[0] >= self.is_splits:
                mean, std = inception_score(logits, self.is_splits, shuffle=self.is_shuffle, seed=self.is_seed)
                out["inception_score"], out["inception_score_std"] = mean, std
        return out


def _pool3_and_logits(out: Mapping[str, Any]):
    logits = out.get("logits_unbiased", out.get("logits"))
    return out["pool3"], logits

"""TokenFlow's shared-mapping dual codebook: one index space, a semantic and a pixel codebook, per-position.

Each of the K entries owns a semantic row (e.g. 32-d) and a pixel row (e.g. 8-d). Both halves of the input and
both tables are l2-normalised at use; the index minimises d_sem + w_dis * d_pix (first index on ties); the output
is the concatenation of the two normalised rows of that *one* index with a straight-through estimator.
Assignment and losses are computed in float32 at HIGHEST precision whatever the compute dtype.

It does not do multi-scale residual quantisation (`residual_quantizer.MultiScaleResidualQuantizer` wraps it) and
keeps no state: the official FIFO `codebook_used` buffer is replaced by per-batch counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.parallel import logical_axes as ax

_HI = jax.lax.Precision.HIGHEST


def codebook_stats(indices: jax.Array, codebook_size: int, valid: jax.Array | None = None) -> dict:
    """counts [K] (float32, like UniTok's MCQ), usage = fraction of entries hit at least once, perplexity =
    exp(entropy of the hit histogram). `valid` masks out entries (dropped scales)."""
    flat = indices.reshape(-1)
    w = jnp.ones(flat.shape, jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    counts = jnp.zeros((codebook_size,), jnp.float32).at[jnp.clip(flat, 0, codebook_size - 1)].add(w)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {
        "counts": counts,
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
        "perplexity": jnp.exp(entropy),
    }


def entropy_loss_from_distances(d: jax.Array, temperature: float = 0.01) -> jax.Array:
    """LlamaGen/TokenFlow compute_entropy_loss(-d): mean per-sample entropy minus entropy of the mean probs."""
    logits = (-d / temperature).reshape(-1, d.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
    avg = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def _codebook_init(codebook_size: int):
    """uniform(-1/K, 1/K) then row-l2-normalised (TokenFlow vq_model.py:589-597)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.uniform(key, shape, dtype, -1.0 / codebook_size, 1.0 / codebook_size)
        return L.l2_normalize(w, axis=-1).astype(dtype)

    return init


class SharedDualCodebookQuantizer(nnx.Module):
    """`quantize(z [..., d_sem + d_pix]) -> (z_q_ste [..., d], aux)`.

    aux: 'indices' int32 [...], 'vq_loss' = mean((zq - sg zn)^2), 'commit_loss' = beta * mean((sg zq - zn)^2),
    'entropy_loss' (0 unless entropy_ratio > 0), 'zn' (normalised input), and when `log_distance_norms`:
    'd_sem_norm' / 'd_pix_norm' = mean over positions of sum_k d_x[k]^2 (official logging scalars), plus
    'index_margin' (second-smallest minus smallest distance).
    """

    def __init__(
        self,
        codebook_size: int,
        semantic_dim: int = 32,
        pixel_dim: int = 8,
        *,
        w_dis: float = 1.0,
        beta: float = 0.25,
        entropy_ratio: float = 0.0,
        entropy_temperature: float = 0.01,
        token_chunk: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.codebook_size = codebook_size
        self.semantic_dim = semantic_dim
        self.pixel_dim = pixel_dim
        self.w_dis = float(w_dis)
        self.beta = float(beta)
        self.entropy_ratio = float(entropy_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.token_chunk = token_chunk
        init = L.partitioned(_codebook_init(codebook_size), (ax.CODEBOOK, None))
        self.embedding_sem = nnx.Param(init(rngs.params(), (codebook_size, semantic_dim)))
        self.embedding_pix = nnx.Param(init(rngs.params(), (codebook_size, pixel_dim)))

    @property
    def dim(self) -> int:
        return self.semantic_dim + self.pixel_dim

    def normalized_codebooks(self) -> tuple[jax.Array, jax.Array]:
        return (
            L.l2_normalize(self.embedding_sem[...], axis=-1),
            L.l2_normalize(self.embedding_pix[...], axis=-1),
        )

    def split_normalize(self, z: jax.Array) -> jax.Array:
        """l2-normalise the semantic and pixel halves separately (float32)."""
        zs, zp = z[..., : self.semantic_dim], z[..., self.semantic_dim :]
        return jnp.concatenate([L.l2_normalize(zs, -1), L.l2_normalize(zp, -1)], axis=-1)

    def distances(self, zn: jax.Array, es: jax.Array, ep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """d_sem, d_pix [m, K] for flat normalised inputs zn [m, d] (official formula ||z||^2 + ||e||^2 - 2 z.e)."""
        zs, zp = zn[:, : self.semantic_dim], zn[:, self.semantic_dim :]

        def sqdist(z, e):
            return (
                jnp.sum(z * z, axis=1, keepdims=True)
                + jnp.sum(e * e, axis=1)[None, :]
                - 2.0 * jnp.einsum("md,kd->mk", z, e, precision=_HI)
            )

        return sqdist(zs, es), sqdist(zp, ep)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Normalised 40-d rows [..., d] for int indices [...] (used by decode-from-indices)."""
        es, ep = self.normalized_codebooks()
        return jnp.concatenate([es[indices], ep[indices]], axis=-1)

    def _assign(self, zn_flat, es, ep, log_distance_norms):
        d_sem, d_pix = self.distances(zn_flat, es, ep)
        d = d_sem + self.w_dis * d_pix
        idx = jnp.argmin(d, axis=1).astype(jnp.int32)  # first index on ties
        out = {"indices": idx}
        if log_distance_norms:
            out["d_sem_sq"] = jnp.sum(d_sem**2, axis=1)
            out["d_pix_sq"] = jnp.sum(d_pix**2, axis=1)
            best = jnp.take_along_axis(d, idx[:, None], axis=1)[:, 0]
            out["margin"] = jnp.min(jnp.where(jnp.arange(d.shape[1])[None] == idx[:, None], jnp.inf, d), 1) - best
        if self.entropy_ratio > 0:
            out["entropy"] = entropy_loss_from_distances(d, self.entropy_temperature)
        return out

    def quantize(self, z: jax.Array, *, log_distance_norms: bool = False) -> tuple[jax.Array, dict]:
        lead = z.shape[:-1]
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"shared quantizer expects {self.dim} channels ({self.semantic_dim}+{self.pixel_dim}), "
                f"got {z.shape[-1]}"
            )
        zn = self.split_normalize(z)
        zn_flat = zn.reshape(-1, self.dim)
        es, ep = self.normalized_codebooks()
        m = zn_flat.shape[0]
        chunk = self.token_chunk
        if chunk and m > chunk and self.entropy_ratio == 0:
            # Bound the [m, K] distance matrix (2227 tokens x 32768 entries at 384 px): assign in chunks.
            pad = (-m) % chunk
            zc = jnp.pad(jax.lax.stop_gradient(zn_flat), ((0, pad), (0, 0))).reshape(-1, chunk, self.dim)
            res = jax.lax.map(lambda c: self._assign(c, es, ep, log_distance_norms), zc)
            res = {k: v.reshape(-1)[:m] for k, v in res.items()}
        else:
            res = self._assign(zn_flat, es, ep, log_distance_norms)  # argmin has no gradient; entropy term does
        idx = res["indices"]
        zq = jnp.concatenate([es[idx], ep[idx]], axis=-1)  # both halves from the same index
        vq_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(zn_flat)))
        commit_loss = self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - zn_flat))
        zq_ste = zn_flat + jax.lax.stop_gradient(zq - zn_flat)
        aux = {
            "indices": idx.reshape(lead),
            "vq_loss": vq_loss,
            "commit_loss": commit_loss,
            "entropy_loss": self.entropy_ratio * res["entropy"] if "entropy" in res else jnp.zeros((), jnp.float32),
            "zn": zn,
        }
        if log_distance_norms:
            aux["d_sem_norm"] = jnp.mean(res["d_sem_sq"])
            aux["d_pix_norm"] = jnp.mean(res["d_pix_sq"])
            aux["index_margin"] = res["margin"].reshape(lead)
        return zq_ste.reshape(lead + (self.dim,)), aux

    def __call__(self, z: jax.Array, **kw):
        return self.quantize(z, **kw)

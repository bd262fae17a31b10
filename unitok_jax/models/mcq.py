"""Multi-codebook quantization (UniTok MCQ): split the latent into k chunks, snap each to its own codebook.

Chunk j of z (channels j·d … (j+1)·d) is l2-normalised in float32 and assigned to the most cosine-similar row of
the l2-normalised codebook j (argmax, first index on ties; matmuls at HIGHEST precision). Output is the
straight-through value ẑ + sg(q − ẑ); loss per codebook β·mean((sg q − ẑ)²) + mean((q − sg ẑ)²), averaged over
codebooks. Code assignment runs ONE codebook at a time (lax.map), so at most one (b·n, K) similarity matrix is
alive. No EMA, no dead-code restarts, no stateful usage buffers: per-call counts/usage/perplexity are returned
instead (under jit on global arrays they are global counts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.parallel import logical_axes as ax

HIGHEST = jax.lax.Precision.HIGHEST
sg = jax.lax.stop_gradient


def codebook_init(codebook_dim: int):
    """Official init (`vocab_init=-1`): uniform(±(1/sqrt(d))/36)."""
    bound = (1.0 / math.sqrt(codebook_dim)) / 36.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def usage_stats(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """counts (k, K) → (usage (k,) = fraction of entries with frequency > 0.01/K, perplexity (k,) = exp(H(p)))."""
    counts = counts.astype(jnp.float32)
    size = counts.shape[-1]
    p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    usage = jnp.mean((p > 0.01 / size).astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return usage, jnp.exp(entropy)


class MultiCodebookQuantizer(nnx.Module):
    """k independent codebooks of K entries × d dims, stored stacked as one (k, K, d) parameter."""

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        codebook_dim: int,
        *,
        rngs: nnx.Rngs,
        beta: float = 0.25,
        l2_norm: bool = True,
    ):
        self.num_codebooks, self.codebook_size, self.codebook_dim = num_codebooks, codebook_size, codebook_dim
        self.beta, self.l2_norm = float(beta), bool(l2_norm)
        init = L.partitioned(codebook_init(codebook_dim), (None, ax.CODEBOOK, None))
        self.codebooks = nnx.Param(init(rngs.params(), (num_codebooks, codebook_size, codebook_dim), jnp.float32))

    # -- helpers -------------------------------------------------------------------------------------------------
    def _norm(self, x):
        return L.l2_normalize(x, axis=-1, eps=1e-12) if self.l2_norm else x.astype(jnp.float32)

    def normalized_codebooks(self) -> jax.Array:
        """(k, K, d) float32 codebook rows as used by the forward (unit-norm when l2_norm)."""
        return self._norm(self.codebooks[...])

    def _split(self, z):
        """(b, n, k·d) → (k, b·n, d) float32."""
        b, n, c = z.shape
        k, d = self.num_codebooks, self.codebook_dim
        if c != k * d:
            raise ValueError(f"quantizer input has {c} channels, expected num_codebooks*codebook_dim = {k}*{d}")
        return rearrange(z.astype(jnp.float32), "b n (k d) -> k (b n) d", k=k)

    def _assign(self, zk, cn):
        """One codebook: zk (m, d) raw chunk, cn (K, d) normalised rows → (idx (m,), q (m, d), ẑ (m, d), counts (K,))."""
        zn = self._norm(zk)
        sim = jnp.dot(sg(zn), sg(cn).T, precision=HIGHEST)  # (m, K): the only large temporary
        if not self.l2_norm:  # nearest neighbour in L2: argmax of 2 z·c − |c|²
            sim = 2.0 * sim - jnp.sum(jnp.square(sg(cn)), axis=-1)[None, :]
        idx = jnp.argmax(sim, axis=-1).astype(jnp.int32)  # first index on ties, like torch.argmax
        q = jnp.take(cn, idx, axis=0)
        counts = jnp.zeros((cn.shape[0],), jnp.float32).at[idx].add(1.0)
        return idx, q, zn, counts

    def _assign_all(self, z):
        zs = self._split(z)
        # Rows are normalised once for all codebooks (k·K·d is small); the (m, K) similarity is per codebook.
        return jax.lax.map(lambda args: self._assign(*args), (zs, self.normalized_codebooks()))

    # -- public API ----------------------------------------------------------------------------------------------
    def __call__(self, z: jax.Array):
        """z (b, n, k·d) → (quant (b, n, k·d) float32 STE output, aux dict).

        aux: indices (b, k, n) int32, loss scalar, loss_per_codebook (k,), counts (k, K), usage (k,) fraction,
        perplexity (k,), z_normalized (b, n, k·d), quant_lookup (b, n, k·d) (pure codebook rows).
        """
        b = z.shape[0]
        idx, q, zn, counts = self._assign_all(z)  # (k, m), (k, m, d), (k, m, d), (k, K)
        loss_k = self.beta * jnp.mean(jnp.square(sg(q) - zn), axis=(1, 2)) + jnp.mean(
            jnp.square(q - sg(zn)), axis=(1, 2)
        )
        out = zn + sg(q - zn)  # straight-through: value q, gradient to ẑ

        def merge(t):  # (k, b·n, d) → (b, n, k·d), codebook j ↔ channels j·d … (j+1)·d
            return rearrange(t, "k (b n) d -> b n (k d)", b=b)

        usage, perplexity = usage_stats(counts)
        aux = {
            "indices": rearrange(idx, "k (b n) -> b k n", b=b),
            "loss": jnp.mean(loss_k),
            "loss_per_codebook": loss_k,
            "counts": counts,
            "usage": usage,
            "perplexity": perplexity,
            "z_normalized": merge(zn),
            "quant_lookup": merge(q),
        }
        return merge(out), aux

    def encode(self, z: jax.Array) -> jax.Array:
        """z (b, n, k·d) → indices (b, k, n) int32 (no loss, no STE)."""
        b, n, _ = z.shape
        idx, _, _, _ = self._assign_all(sg(z))
        return rearrange(idx, "k (b n) -> b k n", b=b)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices (b, k, n) → code vectors (b, n, k·d) (normalised rows concatenated in codebook order)."""
        b, k, n = indices.shape
        if k != self.num_codebooks:
            raise ValueError(f"indices have {k} codebooks on axis 1, expected {self.num_codebooks}")
        cb = self.normalized_codebooks()  # (k, K, d)
        q = cb[jnp.arange(k)[None, :, None], indices]  # (b, k, n, d)
        return rearrange(q, "b k n d -> b n (k d)")

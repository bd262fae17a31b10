"""Residual quantisation, two flavours.

(a) `MultiScaleResidualQuantizer`: VAR/TokenFlow multi-scale residual quantisation around any per-position
    quantizer with a `quantize(z) -> (zq_ste, aux)` / `lookup(idx)` interface (here the shared dual codebook).
    Starting from r = h (not normalised) and f = 0, for each scale s: area-downsample r to s x s, quantise (STE on
    the normalised residual), bicubic-upsample to F x F, f += zq_up, r -= sg(zq_up). The residual stays attached to
    h, so every scale sends gradient to the encoders. Losses are averaged over scales. Optional random scale drop
    (train only): with probability p one scale in 1..L-1 is removed; shapes stay static because the dropped scale
    is masked (no contribution to f, r, losses or counts; its indices are -1).
(b) `ResidualQuantizer`: RQ-VAE style depth-wise residual quantisation at the same position with the interface of
    UniTok's MultiCodebookQuantizer (`__call__(z [b,n,d]) -> (quant, aux)`, aux['indices'] [b,k,n]), so the
    MCQ-vs-RQ ablation is one config switch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.bicubic import area_resize, bicubic_resize
from unitok_jax.models.shared_quantizer import codebook_stats
from unitok_jax.parallel import logical_axes as ax

_HI = jax.lax.Precision.HIGHEST


def _resize_down(x, s):
    return x if x.shape[1] == s and x.shape[2] == s else area_resize(x, s)


def _resize_up(x, size):
    return x if x.shape[1] == size and x.shape[2] == size else bicubic_resize(x, size)


class MultiScaleResidualQuantizer(nnx.Module):
    """`__call__(h [b, F, F, C]) -> (final_quantize [b, F, F, C], aux)` with F = scales[-1].

    aux: 'indices' int32 [b, sum s^2] (coarse -> fine, row-major per scale), 'indices_per_scale' list of [b, s^2],
    'vq_loss', 'commit_loss', 'entropy_loss' (means over kept scales), 'codebook_counts' [K],
    'codebook_usage', 'codebook_perplexity', 'scale_keep' [L]; with `return_intermediates` also 'scales': a list
    of dicts {'residual_in', 'zq', 'zq_up'} and, with `log_distance_norms`, {'d_sem_norm', 'd_pix_norm',
    'index_margin'} per scale plus their means over scales.
    """

    def __init__(self, quantizer: nnx.Module, scales: Sequence[int], *, scale_drop_prob: float = 0.0):
        if list(scales) != sorted(scales) or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be strictly increasing, got {tuple(scales)}")
        self.quantizer = quantizer
        self.scales = tuple(int(s) for s in scales)
        self.scale_drop_prob = float(scale_drop_prob)

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def _scale_keep(self, deterministic: bool, key: jax.Array | None) -> jax.Array | None:
        n = len(self.scales)
        if deterministic or self.scale_drop_prob <= 0.0 or n < 2:
            return None
        if key is None:
            raise ValueError("random scale drop needs an rng key (pass rngs=... or deterministic=True)")
        k1, k2 = jax.random.split(key)
        drop = jax.random.bernoulli(k1, self.scale_drop_prob)
        which = jax.random.randint(k2, (), 1, n)  # any scale but the first, the finest included (official)
        return jnp.where(drop & (jnp.arange(n) == which), 0.0, 1.0).astype(jnp.float32)

    def __call__(
        self,
        h: jax.Array,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
        return_intermediates: bool = False,
        log_distance_norms: bool = False,
    ) -> tuple[jax.Array, dict]:
        b, fh, fw, c = h.shape
        final = self.scales[-1]
        if (fh, fw) != (final, final):
            raise ValueError(f"feature map is {fh}x{fw} but the last quantizer scale is {final}")
        keep = self._scale_keep(deterministic, key)
        h = h.astype(jnp.float32)
        r = h
        f = jnp.zeros_like(h)
        losses = {"vq_loss": [], "commit_loss": [], "entropy_loss": []}
        idx_list, per_scale = [], []
        for i, s in enumerate(self.scales):
            r_s = _resize_down(r, s)
            zq, qa = self.quantizer.quantize(r_s, log_distance_norms=log_distance_norms)
            zq_up = _resize_up(zq, final)
            k_i = None if keep is None else keep[i]
            if k_i is None:
                f = f + zq_up
                r = r - jax.lax.stop_gradient(zq_up)
                idx = qa["indices"]
            else:
                f = f + k_i * zq_up
                r = r - k_i * jax.lax.stop_gradient(zq_up)
                idx = jnp.where(k_i > 0, qa["indices"], -1)
            idx_list.append(idx.reshape(b, s * s))
            for name in losses:
                losses[name].append(qa[name])
            if return_intermediates:
                entry = {"residual_in": r_s, "zq": zq, "zq_up": zq_up}
                for name in ("d_sem_norm", "d_pix_norm", "index_margin"):
                    if name in qa:
                        entry[name] = qa[name].reshape(b, s * s) if name == "index_margin" else qa[name]
                per_scale.append(entry)

        n = len(self.scales)
        weights = jnp.ones((n,), jnp.float32) if keep is None else keep
        denom = jnp.sum(weights)
        aux = {name: jnp.sum(jnp.stack(v) * weights) / denom for name, v in losses.items()}
        indices = jnp.concatenate(idx_list, axis=1)
        valid = None if keep is None else indices >= 0
        stats = codebook_stats(indices, self.quantizer.codebook_size, valid)
        aux.update(
            indices=indices,
            indices_per_scale=idx_list,
            codebook_counts=stats["counts"],
            codebook_usage=stats["usage"],
            codebook_perplexity=stats["perplexity"],
            scale_keep=weights,
        )
        if return_intermediates:
            aux["scales"] = per_scale
            if log_distance_norms:
                for name in ("d_sem_norm", "d_pix_norm"):
                    aux[name] = jnp.sum(jnp.stack([e[name] for e in per_scale]) * weights) / denom
        return f, aux

    def split_indices(self, indices: jax.Array) -> list[jax.Array]:
        """[b, sum s^2] -> list of [b, s, s]. A prefix (the first few scales) is accepted, as officially."""
        b, total = indices.shape
        out, start = [], 0
        for s in self.scales:
            if start == total:
                break
            if start + s * s > total:
                raise ValueError(f"{total} indices are not a prefix of scales {self.scales}")
            out.append(indices[:, start : start + s * s].reshape(b, s, s))
            start += s * s
        if start != total:
            raise ValueError(f"{total} indices do not match scales {self.scales} (expected {self.num_tokens})")
        return out

    def indices_to_quant(self, indices: jax.Array) -> jax.Array:
        """Decode-from-indices: normalised rows per scale, bicubic-upsampled to F x F and summed ([b, F, F, C]).
        Indices < 0 (dropped scales) contribute nothing."""
        final = self.scales[-1]
        f = None
        for idx in self.split_indices(indices):
            rows = self.quantizer.lookup(jnp.maximum(idx, 0))
            rows = jnp.where((idx >= 0)[..., None], rows, 0.0)
            up = _resize_up(rows, final)
            f = up if f is None else f + up
        return f


class ResidualQuantizer(nnx.Module):
    """RQ baseline: `num_stages` codebooks applied depth-wise to the residual at each position.

    Drop-in for UniTok's `MultiCodebookQuantizer` (same call/encode/lookup surface and aux keys), so the MCQ-vs-RQ
    ablation is one config switch; `ResidualQuantizer.from_mcq_args(k, K, d, ...)` quantises the whole k*d latent
    with k stages instead of k chunks.

    `__call__(z [b, n, dim]) -> (quant [b, n, dim], aux)`; quant = z + sg(sum_i q_i - z) (straight-through).
    aux: 'indices' int32 [b, k, n] (k = num_stages); 'vq_loss' (= 'loss') = mean over stages of
    mean((q_i - sg r_i)^2) + beta * mean((sg q_i - r_i)^2) with r_i = z - sg(sum_{j<i} q_j) (the commitment term is
    RQ-VAE's cumulative one), 'loss_per_codebook' [k]; 'codebook_counts' (= 'counts') float32 [k, K];
    'codebook_usage' (= 'usage') [k], fraction of entries with frequency > 0.01/K (MCQ's definition);
    'codebook_perplexity' (= 'perplexity') [k]; 'z_normalized' (the quantised target), 'quant_lookup' (sum of
    codes, no STE).

    `l2_norm=True` l2-normalises the input latent first (UniTok's MCQ works on normalised latents, so both
    quantizers then see unit-norm targets); codebooks are plain Euclidean at every stage, because the leftover
    residuals shrink and unit-norm rows could not represent them. Default False = plain RQ-VAE.
    """

    def __init__(
        self,
        num_stages: int,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        l2_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_stages = num_stages
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = float(beta)
        self.l2_norm = bool(l2_norm)
        w = jax.random.uniform(
            rngs.params(), (num_stages, codebook_size, dim), jnp.float32, -1.0 / codebook_size, 1.0 / codebook_size
        )
        self.codebooks = nnx.Param(w, out_sharding=(None, ax.CODEBOOK, None))

    @classmethod
    def from_mcq_args(
        cls,
        num_codebooks: int,
        codebook_size: int,
        codebook_dim: int,
        *,
        rngs: nnx.Rngs,
        beta: float = 0.25,
        l2_norm: bool = True,
    ) -> "ResidualQuantizer":
        """Same arguments as `MultiCodebookQuantizer`: k stages over the full k*d latent."""
        return cls(num_codebooks, codebook_size, num_codebooks * codebook_dim, beta=beta, l2_norm=l2_norm, rngs=rngs)

    def _prepare(self, z):
        b, n, d = z.shape
        if d != self.dim:
            raise ValueError(f"ResidualQuantizer expects dim {self.dim}, got {d}")
        z = z.astype(jnp.float32)
        return L.l2_normalize(z, -1) if self.l2_norm else z

    def _assign(self, r, e):
        """r [m, d] (no gradient needed), e [K, d] -> int32 [m] nearest rows in L2 (first index on ties)."""
        r, e = jax.lax.stop_gradient(r), jax.lax.stop_gradient(e)
        dist = jnp.sum(e * e, 1)[None] - 2.0 * jnp.einsum("md,kd->mk", r, e, precision=_HI)
        return jnp.argmin(dist, axis=1).astype(jnp.int32)

    def __call__(self, z: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        del deterministic, rngs  # no randomness; accepted for interface symmetry
        b, n, _ = z.shape
        z = self._prepare(z)
        d = self.dim
        r = z
        total = jnp.zeros_like(z)
        idx_all, losses, counts = [], [], []
        for i in range(self.num_stages):
            e = self.codebooks[...][i].astype(jnp.float32)
            idx = self._assign(r.reshape(-1, d), e).reshape(b, n)
            q = e[idx]
            losses.append(
                jnp.mean(jnp.square(q - jax.lax.stop_gradient(r)))
                + self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(q) - r))
            )
            total = total + q
            r = r - jax.lax.stop_gradient(q)
            idx_all.append(idx)
            counts.append(jnp.zeros((self.codebook_size,), jnp.float32).at[idx.reshape(-1)].add(1.0))
        counts = jnp.stack(counts)
        p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
        usage = jnp.mean((p > 0.01 / self.codebook_size).astype(jnp.float32), axis=-1)
        perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
        loss_k = jnp.stack(losses)
        quant = z + jax.lax.stop_gradient(total - z)
        aux = {
            "indices": jnp.stack(idx_all, axis=1),
            "vq_loss": jnp.mean(loss_k),
            "loss_per_codebook": loss_k,
            "codebook_counts": counts,
            "codebook_usage": usage,
            "codebook_perplexity": perplexity,
            "z_normalized": z,
            "quant_lookup": total,
        }
        aux.update(loss=aux["vq_loss"], counts=counts, usage=usage, perplexity=perplexity)  # MCQ key names
        return quant, aux

    def encode(self, z: jax.Array) -> jax.Array:
        """z [b, n, dim] -> indices [b, k, n] int32 (no loss, no STE)."""
        b, n, _ = z.shape
        r = jax.lax.stop_gradient(self._prepare(z)).reshape(-1, self.dim)
        out = []
        for i in range(self.num_stages):
            e = self.codebooks[...][i].astype(jnp.float32)
            idx = self._assign(r, e)
            r = r - e[idx]
            out.append(idx.reshape(b, n))
        return jnp.stack(out, axis=1)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [b, k, n] -> summed code vectors [b, n, dim]."""
        if indices.shape[1] != self.num_stages:
            raise ValueError(f"indices have {indices.shape[1]} stages on axis 1, expected {self.num_stages}")
        cb = self.codebooks[...].astype(jnp.float32)
        out = 0.0
        for i in range(self.num_stages):
            out = out + cb[i][indices[:, i]]
        return out

"""UniTok's attention projection: changes the token width (1024→64 before the quantizer, 64→1024 after it).

y = Linear(LN3(x)) + AttnProj(LN1(x)); y = y + GeGLU(LN2(y)). The three outer LNs use eps 1e-5 (plain torch
LayerNorm), the GeGLU's inner LN eps 1e-6, GeGLU hidden = 2·out. The attention runs at width max(in, out) with a
bias-free qkv Linear plus learned q/v biases (the k bias is the official constant zero buffer, not a parameter);
heads are averaged ('mean', compressing direction) or concatenated ('concat', expanding direction). No positional
embedding; `causal=True` reproduces the pre-April-2025 checkpoint variant. UniTok runs this module in float32 at
HIGHEST matmul precision regardless of the model's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.vit import GeGluMlp, dot_product_attention
from unitok_jax.parallel import logical_axes as ax

HEAD_REDUCTIONS = ("mean", "concat")


def check_attn_projection(in_dim: int, out_dim: int, heads: int, head_reduction: str, name: str = "attn_projection"):
    """Raise ValueError naming the field when the dims/heads/reduction combination is not realisable."""
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"{name}.head_reduction must be one of {list(HEAD_REDUCTIONS)}, got {head_reduction!r}")
    if min(in_dim, out_dim, heads) <= 0:
        raise ValueError(f"{name}: in_dim, out_dim and heads must be positive, got {in_dim}, {out_dim}, {heads}")
    width = max(in_dim, out_dim)
    if width % heads:
        raise ValueError(f"{name}: attention width max(in_dim, out_dim)={width} is not divisible by heads={heads}")
    if head_reduction == "mean" and width // heads != out_dim:
        raise ValueError(
            f"{name}: head_reduction 'mean' needs max(in_dim, out_dim) / heads == out_dim "
            f"({width}/{heads}={width // heads} != out_dim={out_dim})"
        )
    if head_reduction == "concat" and width != out_dim:
        raise ValueError(
            f"{name}: head_reduction 'concat' needs out_dim >= in_dim (got in_dim={in_dim}, out_dim={out_dim})"
        )


class ProjAttention(nnx.Module):
    """Multi-head attention from in_dim tokens at width max(in,out); qkv without bias + [q_bias, 0, v_bias]."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int,
        *,
        rngs: nnx.Rngs,
        head_reduction: str = "mean",
        causal: bool = False,
        dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    ):
        width = max(in_dim, out_dim)
        self.heads, self.width, self.head_reduction, self.causal, self.precision = (
            heads,
            width,
            head_reduction,
            causal,
            precision,
        )
        in_axis = ax.EMBED if in_dim == width else None
        self.qkv = L.dense(
            in_dim, 3 * width, axes=(in_axis, ax.HEADS), use_bias=False, dtype=dtype, precision=precision, rngs=rngs
        )
        self.q_bias = nnx.Param(L.partitioned(L.zeros, (ax.HEADS,))(rngs.params(), (width,), jnp.float32))
        self.v_bias = nnx.Param(L.partitioned(L.zeros, (ax.HEADS,))(rngs.params(), (width,), jnp.float32))
        attn_out = width // heads if head_reduction == "mean" else width
        out_axis = ax.EMBED if out_dim == width else None
        self.proj = L.dense(
            attn_out,
            out_dim,
            axes=(ax.HEADS if head_reduction == "concat" else None, out_axis),
            dtype=dtype,
            precision=precision,
            rngs=rngs,
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = (self.qkv(x) + bias.astype(self.dtype)).reshape(b, n, 3, self.heads, self.width // self.heads)
        o = dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=self.causal, precision=self.precision
        )  # (b, n, h, hd)
        if self.head_reduction == "mean":
            o = jnp.mean(o, axis=2)
        else:
            o = o.reshape(b, n, self.width)  # head-major concatenation
        return self.proj(o)


class AttnProjection(nnx.Module):
    """UniTok AttnProjection(in_dim → out_dim); see the module docstring."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int,
        *,
        rngs: nnx.Rngs,
        head_reduction: str = "mean",
        causal: bool = False,
        dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    ):
        check_attn_projection(in_dim, out_dim, heads, head_reduction)
        width = max(in_dim, out_dim)
        in_axis = ax.EMBED if in_dim == width else None
        out_axis = ax.EMBED if out_dim == width else None
        self.norm1 = L.layer_norm(in_dim, 1e-5, dtype=dtype, rngs=rngs)
        self.attn = ProjAttention(
            in_dim,
            out_dim,
            heads,
            head_reduction=head_reduction,
            causal=causal,
            dtype=dtype,
            precision=precision,
            rngs=rngs,
        )
        self.norm3 = L.layer_norm(in_dim, 1e-5, dtype=dtype, rngs=rngs)
        self.proj = L.dense(in_dim, out_dim, axes=(in_axis, out_axis), dtype=dtype, precision=precision, rngs=rngs)
        self.norm2 = L.layer_norm(out_dim, 1e-5, dtype=dtype, rngs=rngs)
        self.mlp = GeGluMlp(
            out_dim, 2 * out_dim, norm_eps=1e-6, dtype=dtype, precision=precision, in_axis=out_axis, rngs=rngs
        )

    def __call__(self, x: jax.Array, *, return_intermediates: bool = False):
        """x (b, n, in_dim) → y (b, n, out_dim) [, {'shortcut', 'attn'}]."""
        shortcut = self.proj(self.norm3(x))
        attn = self.attn(self.norm1(x))
        y = shortcut + attn
        y = y + self.mlp(self.norm2(y))
        if return_intermediates:
            return y, {"shortcut": shortcut, "attn": attn}
        return y

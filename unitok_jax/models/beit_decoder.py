"""TokenFlow's semantic decoder: a BEiT-v2 (vqkd_model.VisionTransformer) ViT over the quantised semantic map.

1x1 conv patch embed, class token, learned positional table (bicubically interpolated with the DINO +0.1 scale
factor when the grid differs), pre-LN blocks with qkv (no Linear bias) + [q_bias, 0, v_bias], exact GELU MLP,
LN eps 1e-6, no layer-scale; `use_mean_pooling=True` in the official model means `norm` is Identity and `fc_norm`
is applied to the patch tokens (class token dropped). The regression head (`decode_task_layer`) lives in the
composite. Returns patch tokens [b, n, d].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.bicubic import interpolate_pos_table
from unitok_jax.parallel import logical_axes as ax


class BeitAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads = heads
        self.qkv = L.dense(dim, 3 * dim, axes=(ax.EMBED, ax.HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(ax.NORM,))
        self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(ax.NORM,))
        self.proj = L.dense(dim, dim, axes=(ax.HEADS, ax.EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
        qkv = (self.qkv(x) + bias.astype(x.dtype)).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0] * (hd**-0.5), qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d))


class BeitMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = L.dense(dim, hidden, axes=(ax.EMBED, ax.MLP), dtype=dtype, rngs=rngs)
        self.fc2 = L.dense(hidden, dim, axes=(ax.MLP, ax.EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(L.gelu(self.fc1(x)))


class BeitBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = L.layer_norm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.attn = BeitAttention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm2 = L.layer_norm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.mlp = BeitMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BeitDecoder(nnx.Module):
    """`__call__(z [b, g, g, in_chans], interpolate=...) -> (tokens [b, g*g, embed_dim], aux)`;
    aux['pos_embed_used'] is the (1, n+1, d) table actually added."""

    def __init__(
        self,
        *,
        in_chans: int = 32,
        embed_dim: int = 768,
        depth: int = 3,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        grid: int = 14,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.grid = grid
        self.patch_embed = L.conv2d(in_chans, embed_dim, 1, padding=0, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(
            L.trunc_normal_02(rngs.params(), (1, 1, embed_dim)), out_sharding=(None, None, ax.EMBED)
        )
        self.pos_embed = nnx.Param(
            L.trunc_normal_02(rngs.params(), (1, grid * grid + 1, embed_dim)), out_sharding=(None, None, ax.EMBED)
        )
        self.blocks = nnx.List([BeitBlock(embed_dim, heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.fc_norm = L.layer_norm(embed_dim, 1e-6, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def pos_embed_for_grid(self, grid: tuple[int, int], interpolate: bool) -> jax.Array:
        table = self.pos_embed[...][0]
        if tuple(grid) == (self.grid, self.grid):
            return table
        if not interpolate:
            raise ValueError(
                f"semantic decoder: {grid[0]}x{grid[1]} grid but positional table is {self.grid}x{self.grid}; "
                "set infer_interpolate=True"
            )
        return jnp.concatenate([table[:1], interpolate_pos_table(table[1:], grid)], axis=0)

    def __call__(self, z: jax.Array, *, interpolate: bool = True) -> tuple[jax.Array, dict]:
        x = self.patch_embed(z.astype(self.dtype))
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        pos = self.pos_embed_for_grid((gh, gw), interpolate)
        x = x + pos.astype(x.dtype)[None]
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:]), {"pos_embed_used": pos[None]}

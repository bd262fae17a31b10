"""OpenCLIP text transformer (UniTok's text tower): token embedding + learned positions → pre-LN residual blocks
with packed multi-head attention under an additive causal mask and an exact-GELU MLP → ln_final → the token at
argmax(ids) (EOT, the largest id) → `x @ text_projection`. LayerNorm eps 1e-5 everywhere. Returns unnormalised
features; the UniTok composite l2-normalises them. No cls token, no layer-scale, no attention pooling.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.vit import BlockStack, dot_product_attention
from unitok_jax.parallel import logical_axes as ax

TEXT_POOLS = ("argmax_eot",)


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


def torch_default_uniform(fan_in: int):
    """PyTorch's default nn.Linear weight/bias init: uniform(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TextAttention(nnx.Module):
    """nn.MultiheadAttention(batch_first) with packed in_proj (columns [q | k | v], head-major) and out_proj."""

    def __init__(self, width: int, heads: int, layers: int, *, causal: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads, self.causal = heads, causal
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        self.in_proj = L.dense(
            width, 3 * width, axes=(ax.EMBED, ax.HEADS), kernel_init=normal_init(width**-0.5), dtype=dtype, rngs=rngs
        )
        self.out_proj = L.dense(
            width, width, axes=(ax.HEADS, ax.EMBED), kernel_init=normal_init(proj_std), dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        b, t, d = x.shape
        qkv = self.in_proj(x).reshape(b, t, 3, self.heads, d // self.heads)
        o = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=self.causal)
        return self.out_proj(o.reshape(b, t, d))


class TextMlp(nnx.Module):
    def __init__(self, width: int, hidden: int, layers: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        self.c_fc = L.dense(
            width,
            hidden,
            axes=(ax.EMBED, ax.MLP),
            kernel_init=normal_init((2 * width) ** -0.5),
            bias_init=torch_default_uniform(width),
            dtype=dtype,
            rngs=rngs,
        )
        self.c_proj = L.dense(
            hidden,
            width,
            axes=(ax.MLP, ax.EMBED),
            kernel_init=normal_init(proj_std),
            bias_init=torch_default_uniform(hidden),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        return self.c_proj(L.gelu(self.c_fc(x)))


class TextResBlock(nnx.Module):
    """open_clip ResidualAttentionBlock: x + attn(ln_1 x); x + mlp(ln_2 x)."""

    def __init__(self, width, heads, mlp_ratio, layers, *, causal: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln_1 = L.layer_norm(width, 1e-5, dtype=dtype, rngs=rngs)
        self.attn = TextAttention(width, heads, layers, causal=causal, dtype=dtype, rngs=rngs)
        self.ln_2 = L.layer_norm(width, 1e-5, dtype=dtype, rngs=rngs)
        self.mlp = TextMlp(width, int(width * mlp_ratio), layers, dtype=dtype, rngs=rngs)

    def __call__(self, x, drop_rate=0.0, key=None):
        del drop_rate, key  # no stochastic depth in the text tower
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nnx.Module):
    """`cfg` is the `text` block of the UniTok config; `embed_dim` the CLIP output width."""

    def __init__(
        self,
        cfg,
        embed_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
        scan_blocks: bool = False,
    ):
        width, layers, heads = cfg.width, cfg.layers, cfg.heads
        mlp_ratio = cfg.get("mlp_ratio", 4.0) if hasattr(cfg, "get") else 4.0
        causal = bool(cfg.causal)
        self.dtype = dtype
        self.context_length = cfg.context_length
        self.token_embedding = nnx.Embed(
            cfg.vocab_size,
            width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=L.partitioned(normal_init(0.02), (ax.VOCAB, ax.EMBED)),
            rngs=rngs,
        )
        self.positional_embedding = nnx.Param(
            L.partitioned(normal_init(0.01), (None, ax.EMBED))(rngs.params(), (cfg.context_length, width), jnp.float32)
        )
        self.resblocks = BlockStack(
            lambda r: TextResBlock(width, heads, mlp_ratio, layers, causal=causal, dtype=dtype, rngs=r),
            layers,
            scan=scan_blocks,
            remat=remat,
            rngs=rngs,
        )
        self.ln_final = L.layer_norm(width, 1e-5, dtype=dtype, rngs=rngs)
        self.text_projection = nnx.Param(
            L.partitioned(normal_init(width**-0.5), (ax.EMBED, None))(rngs.params(), (width, embed_dim), jnp.float32)
        )

    def __call__(self, ids: jax.Array, *, return_intermediates: bool = False):
        """ids (b, t) int → (features (b, embed_dim) unnormalised, intermediates or None)."""
        b, t = ids.shape
        if t > self.context_length:
            raise ValueError(f"text has {t} tokens, more than context_length={self.context_length}")
        inter = {}
        x = self.token_embedding(ids)
        inter["text_token_emb"] = x
        x = x + self.positional_embedding[...][:t].astype(x.dtype)
        x, outs = self.resblocks(x, return_all=return_intermediates)
        for i, o in enumerate(outs):
            inter[f"text_block{i}"] = o
        x = self.ln_final(x)
        inter["text_ln_final"] = x
        pooled = x[jnp.arange(b), jnp.argmax(ids, axis=-1)]
        feats = jnp.dot(pooled, self.text_projection[...].astype(x.dtype))
        inter["text_pooled_proj"] = feats
        return feats, (inter if return_intermediates else None)

"""TokenFlow's semantic encoder: an OpenAI-CLIP-style ViT (class token, learned positions, QuickGELU) or a SigLIP ViT.

Returns patch tokens [b, n, d] (class token dropped), optionally projected by `proj` (the frozen CLIP teacher's
`ln_post(x)[:, 1:] @ visual.proj`). It does not normalise pixels: the TokenFlow *student* consumes [-1, 1] images
directly; the teacher wrapper (`unitok_jax.models.tokenflow.Teacher`) applies CLIP mean/std.

Variants are configs of one module (`ViTConfig.from_dict`):
- 'clip_vit'   (OpenAI CLIP; TokenFlow clipb_224): conv1 without bias, class token, positional table (n+1, d),
               ln_pre, pre-LN blocks with packed MHA and QuickGELU MLP, ln_post on all tokens, LN eps 1e-5.
- 'siglip_vit' (HF SiglipVisionModel; TokenFlow siglip_384): patch conv with bias, no class token, positional
               table (n, d), no ln_pre, GELU-tanh, LN eps 1e-6; the student output is hidden_states[-2], i.e. the
               first `layers - 1` blocks without post-LayerNorm (`output_layer=-2`), so the unused last block,
               post_layernorm and MAP head are not built (the converter ignores their keys). The HF q/k/v
               projections are packed into `in_proj` by the converter.
The third variant, ViTamin (TokenFlow vitamin_xlarge_256), is a different architecture (hybrid MbConv stem, no
class token, no positional table) and lives in `unitok_jax.models.vitamin_semantic` with the same interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.bicubic import interpolate_pos_table
from unitok_jax.parallel import logical_axes as ax

_ACTS = {"quick_gelu": L.quick_gelu, "gelu": L.gelu, "gelu_tanh": L.gelu_tanh}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    kind: str = "clip_vit"  # 'clip_vit' | 'siglip_vit'
    input_resolution: int = 224  # resolution the positional table was trained for
    patch_size: int = 16
    width: int = 768
    layers: int = 12  # layers in the checkpoint
    heads: int = 12
    mlp_dim: int | None = None  # default 4 * width (SigLIP-so400m: 4304)
    act: str = "quick_gelu"
    class_token: bool = True
    ln_pre: bool = True
    ln_post: bool = True
    patch_bias: bool = False
    ln_eps: float = 1e-5
    output_layer: int = -1  # -1: last block; -2: hidden_states[-2] (SigLIP student)
    proj_dim: int | None = None  # CLIP `visual.proj` (teacher only)
    pool: str = "none"  # 'none' (patch tokens) | 'mean' | 'cls' (also returned in aux)

    @property
    def grid(self) -> int:
        return self.input_resolution // self.patch_size

    @property
    def num_blocks(self) -> int:
        """Blocks actually built/run: output_layer=-2 drops the last one."""
        return self.layers + 1 + self.output_layer

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
        d = dict(d)
        kind = d.get("kind", "clip_vit")
        if kind == "siglip_vit":
            defaults = dict(
                act="gelu_tanh",
                class_token=False,
                ln_pre=False,
                ln_post=False,
                patch_bias=True,
                ln_eps=1e-6,
                output_layer=-2,
            )
        elif kind == "clip_vit":
            defaults = {}
        else:
            raise ValueError(f"unknown semantic encoder kind {kind!r}; available: ['clip_vit', 'siglip_vit']")
        defaults.update(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise ValueError(f"unknown ViT config keys {unknown}; available: {sorted(names)}")
        if defaults.get("act", "quick_gelu") not in _ACTS:
            raise ValueError(f"unknown act {defaults['act']!r}; available: {sorted(_ACTS)}")
        return cls(**defaults)


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention (batch-first here): packed in_proj [q; k; v], heads split head-major."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads = heads
        self.in_proj = L.dense(width, 3 * width, axes=(ax.EMBED, ax.HEADS), dtype=dtype, rngs=rngs)
        self.out_proj = L.dense(width, width, axes=(ax.HEADS, ax.EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.in_proj(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return self.out_proj(out)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.act = _ACTS[act]
        self.c_fc = L.dense(width, hidden, axes=(ax.EMBED, ax.MLP), dtype=dtype, rngs=rngs)
        self.c_proj = L.dense(hidden, width, axes=(ax.MLP, ax.EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        w = cfg.width
        self.ln_1 = L.layer_norm(w, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.attn = MultiheadAttention(w, cfg.heads, dtype=dtype, rngs=rngs)
        self.ln_2 = L.layer_norm(w, cfg.ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(w, cfg.mlp_dim or 4 * w, cfg.act, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPViT(nnx.Module):
    """Semantic ViT. `__call__(images [b,H,W,3], interpolate=...) -> (tokens [b, n, d or proj_dim], aux)`.

    aux: 'pos_embed_used' (the table actually added, with the class row first for CLIP) and 'pooled' when
    `pool != 'none'`.
    """

    def __init__(self, cfg: ViTConfig | Mapping[str, Any], *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg = cfg if isinstance(cfg, ViTConfig) else ViTConfig.from_dict(cfg)
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.conv1 = L.conv2d(3, w, p, stride=p, padding=0, use_bias=cfg.patch_bias, dtype=dtype, rngs=rngs)
        scale = w**-0.5  # OpenAI CLIP init
        n_pos = cfg.grid**2 + (1 if cfg.class_token else 0)
        cls = None
        if cfg.class_token:
            cls = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)), out_sharding=(ax.EMBED,))
        self.class_embedding = cls  # (assign once: flax 0.12 refuses to turn a static None attribute into data)
        self.positional_embedding = nnx.Param(
            scale * jax.random.normal(rngs.params(), (n_pos, w)), out_sharding=(None, ax.EMBED)
        )
        self.ln_pre = L.layer_norm(w, cfg.ln_eps, dtype=dtype, rngs=rngs) if cfg.ln_pre else None
        self.resblocks = nnx.List([ResidualAttentionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.ln_post = L.layer_norm(w, cfg.ln_eps, dtype=dtype, rngs=rngs) if cfg.ln_post else None
        self.proj = (
            nnx.Param(scale * jax.random.normal(rngs.params(), (w, cfg.proj_dim)), out_sharding=(ax.EMBED, None))
            if cfg.proj_dim
            else None
        )
        self.dtype = dtype

    def pos_embed_for_grid(self, grid: tuple[int, int], interpolate: bool) -> jax.Array:
        table = self.positional_embedding[...]
        g0 = self.cfg.grid
        if tuple(grid) == (g0, g0):
            return table
        if not interpolate:
            raise ValueError(
                f"semantic encoder: input gives a {grid[0]}x{grid[1]} patch grid but the positional table is "
                f"{g0}x{g0}; set infer_interpolate=True to interpolate it (TokenFlow --infer_interpolate)"
            )
        if self.cfg.class_token:
            return jnp.concatenate([table[:1], interpolate_pos_table(table[1:], grid)], axis=0)
        return interpolate_pos_table(table, grid)

    def __call__(self, images: jax.Array, *, interpolate: bool = True) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        x = self.conv1(images.astype(self.dtype))  # [b, gh, gw, w]
        b, gh, gw, w = x.shape
        x = x.reshape(b, gh * gw, w)
        if cfg.class_token:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, w))
            x = jnp.concatenate([cls, x], axis=1)
        pos = self.pos_embed_for_grid((gh, gw), interpolate)
        x = x + pos.astype(x.dtype)[None]
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        for blk in self.resblocks:
            x = blk(x)
        if self.ln_post is not None:
            x = self.ln_post(x)
        aux = {"pos_embed_used": pos[None]}
        if cfg.pool == "cls":
            aux["pooled"] = x[:, 0]
        if cfg.class_token:
            x = x[:, 1:]
        if self.proj is not None:
            x = x @ self.proj[...].astype(x.dtype)
        if cfg.pool == "mean":
            aux["pooled"] = jnp.mean(x, axis=1)
        return x, aux


class TaskLayer(nnx.Module):
    """TokenFlow's encode/decode_task_layer: Linear(d_in, hidden) - tanh - Linear(hidden, out); torch keys .0 / .2."""

    def __init__(self, d_in: int, hidden: int, out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc0 = L.dense(d_in, hidden, axes=(ax.EMBED, ax.MLP), dtype=dtype, rngs=rngs)
        self.fc2 = L.dense(hidden, out, axes=(ax.MLP, ax.EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc0(x)))

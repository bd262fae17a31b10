"""ViTamin as TokenFlow's semantic encoder (the paper's `vitamin_xlarge_256` variant).

timm's `vitamin_xlarge_256` with `head` and `fc_norm` deleted is UniTok's hybrid ViTamin encoder
(`unitok_jax.models.vitamin`) at XL size: conv stem 192 → MbConv stages (192, 384) × (2, 4) → strided conv to
1152 → 32 GeGLU ViT blocks (16 heads, MLP ratio 2), no class token, no positional table, and no final LayerNorm
(timm's `norm` is Identity under `global_pool='avg'`). Output: row-major patch tokens (b, (H/16)², 1152), 256 at
256 px. The student sees CLIP mean/std-normalised pixels (the official `ScalingLayerForClip`); so does the frozen
ViTamin teacher (`forward_features`).

This module only adapts the encoder to the semantic-encoder interface that `CLIPViT` defines:
`__call__(images, interpolate=...) -> (tokens, aux)` and a config with `kind`, `width` and `grid`.
No TokenFlow ViTamin checkpoint was released, so this path is verified on random weights (shapes, key map and a
training step) rather than against official outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models.vitamin import ViTaminEncoder

DOWNSAMPLE = 16  # stem 2x, two MbConv stages 2x each, strided conv 2x


@dataclasses.dataclass(frozen=True)
class ViTaminSemanticConfig:
    kind: str = "vitamin"
    input_resolution: int = 256
    stem_width: int = 192
    stage_widths: tuple = (192, 384)
    stage_depths: tuple = (2, 4)
    mbconv_expand_ratio: float = 4.0
    vit_width: int = 1152
    vit_depth: int = 32
    vit_heads: int = 16
    mlp_ratio: float = 2.0
    final_norm: bool = False  # timm global_pool='avg': `norm` is Identity
    remat: str = "none"  # remat policy of the MbConv blocks and ViT stack (models/vit.REMAT_POLICIES)

    @property
    def width(self) -> int:
        return self.vit_width

    @property
    def grid(self) -> int:
        return self.input_resolution // DOWNSAMPLE

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViTaminSemanticConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ViTamin semantic-encoder option(s) {unknown}; available: {sorted(names)}")
        for key in ("stage_widths", "stage_depths"):
            if key in d:
                d[key] = tuple(d[key])
        cfg = cls(**d)
        if len(cfg.stage_widths) != len(cfg.stage_depths) or len(cfg.stage_widths) != 2:
            raise ValueError(
                "ViTamin semantic encoder: stage_widths and stage_depths must both have 2 entries "
                f"(16x downsampling), got {cfg.stage_widths} and {cfg.stage_depths}"
            )
        if cfg.vit_width % cfg.vit_heads:
            raise ValueError(
                f"ViTamin semantic encoder: vit_width {cfg.vit_width} is not divisible by vit_heads {cfg.vit_heads}"
            )
        return cfg


class ViTaminSemantic(nnx.Module):
    """`ViTaminSemantic(cfg, rngs=...)(images [b, H, W, 3]) -> (tokens [b, (H/16)·(W/16), width], aux)`.

    Pixels are taken as given (the caller applies the CLIP normalisation). There is no positional table, so any
    input size divisible by 16 works and `interpolate` has nothing to do.
    """

    def __init__(self, cfg: ViTaminSemanticConfig | Mapping[str, Any], *, rngs, dtype=jnp.float32):
        cfg = cfg if isinstance(cfg, ViTaminSemanticConfig) else ViTaminSemanticConfig.from_dict(cfg)
        self.cfg = cfg
        self.encoder = ViTaminEncoder(cfg, rngs=rngs, dtype=dtype, remat=cfg.remat)
        self.dtype = dtype

    def __call__(self, images: jax.Array, *, interpolate: bool = True) -> tuple[jax.Array, dict]:
        del interpolate  # no positional table
        if images.shape[1] % DOWNSAMPLE or images.shape[2] % DOWNSAMPLE:
            raise ValueError(f"ViTamin semantic encoder: image size {images.shape[1:3]} is not a multiple of 16")
        tokens, _, _ = self.encoder(images.astype(self.dtype))
        return tokens, {}

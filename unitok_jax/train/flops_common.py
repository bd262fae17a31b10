"""FLOP-counting building blocks shared by every model's counter (units of `unitok_jax.train.flops`: 2 per
multiply-add, matmuls and convolutions, attention products unless asked not to), forward FLOPs for ONE example."""

from __future__ import annotations

import dataclasses
from typing import Mapping


def dense(n: int, d_in: int, d_out: int) -> float:
    return 2.0 * n * d_in * d_out


def conv(h_out: int, w_out: int, k: int, c_in: int, c_out: int, groups: int = 1) -> float:
    return 2.0 * h_out * w_out * k * k * (c_in // groups) * c_out


def attention_products(n: int, width: int, m: int | None = None) -> float:
    """q·kᵀ and softmax·v for n queries over m keys at total width `width` (all heads)."""
    return 4.0 * n * (n if m is None else m) * width


def vit_block(n: int, d: int, mlp_hidden: int, *, geglu: bool, include_attention: bool = True) -> float:
    """Pre-norm ViT block: fused qkv, out proj, MLP (GeGLU = two input matrices)."""
    mlp = dense(n, d, mlp_hidden) * (2 if geglu else 1) + dense(n, mlp_hidden, d)
    return dense(n, d, 3 * d) + dense(n, d, d) + mlp + (attention_products(n, d) if include_attention else 0.0)


def config_value(cfg, key, default=None):
    """cfg[key] for a dict, ConfigDict or dataclass; `default` when missing or None."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        v = cfg.get(key, default)
        return default if v is None else v
    return getattr(cfg, key, default)


def encoder_flops(enc, image_size: int, *, include_attention: bool = True) -> dict[str, float]:
    """ViTamin hybrid encoder: conv stem, MBConv stages, strided conv, ViT blocks."""
    r = image_size // 2
    stem_w = enc.stem_width
    convs = conv(r, r, 3, 3, stem_w) + conv(r, r, 3, stem_w, stem_w)
    cin = stem_w
    for width, depth in zip(enc.stage_widths, enc.stage_depths):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            mid = int(width * enc.mbconv_expand_ratio)
            r_out = r // stride
            convs += (
                conv(r, r, 1, cin, mid)
                + conv(r_out, r_out, 3, mid, mid, groups=mid)
                + conv(r_out, r_out, 1, mid, width)
            )
            if cin != width:  # stride 2: avg-pool then 1x1; stride 1: 1x1
                convs += conv(r_out, r_out, 1, cin, width)
            cin, r = width, r_out
    r //= 2
    convs += conv(r, r, 3, cin, enc.vit_width)
    n = r * r
    vit = enc.vit_depth * vit_block(
        n, enc.vit_width, int(enc.vit_width * enc.mlp_ratio), geglu=True, include_attention=include_attention
    )
    return {"encoder_convs": convs, "encoder_vit": vit}


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    forward: float  # forward FLOPs for the whole global batch
    multiplier: int  # 3 trained, 2 frozen on the gradient path, 1 forward only

    @property
    def total(self) -> float:
        return self.forward * self.multiplier

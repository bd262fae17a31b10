"""ViTamin hybrid image encoder as used by UniTok: conv stem → MBConv stages → strided conv → ViT trunk → LN.

Input NHWC images, output row-major tokens (b, h·w, d) with a 16× downsampling (stem 2×, each MBConv stage 2×,
strided conv 2×). No positional embedding (the official all-zero frozen `pos_embed` is dropped by the converter),
no class/register tokens. Every 3×3 conv pads symmetrically by 1, also at stride 2 (PyTorch semantics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.vit import Block, BlockStack, maybe_remat


def timm_conv_init(groups: int = 1):
    """timm/ViTamin `_init_conv`: normal(0, sqrt(2 / fan_out)), fan_out = kh·kw·out / groups."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        fan_out = kh * kw * out // groups
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)

    return init


def _conv(cin, cout, k, *, rngs, stride=1, groups=1, dtype=jnp.float32):
    return L.conv2d(
        cin, cout, k, stride=stride, groups=groups, dtype=dtype, kernel_init=timm_conv_init(groups), rngs=rngs
    )


class Stem(nnx.Module):
    """conv3×3/2 → LN2d(1e-6) + GELU → conv3×3 (no activation after)."""

    def __init__(self, cin: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv1 = _conv(cin, width, 3, stride=2, dtype=dtype, rngs=rngs)
        self.norm1 = L.layer_norm(width, 1e-6, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv2(L.gelu(self.norm1(self.conv1(x))))


class Downsample2d(nnx.Module):
    """Shortcut of a stride-2 MBConv: AvgPool 3×3/2 pad 1 excluding padding, then 1×1 conv if channels change."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.expand = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x):
        x = L.avg_pool_3x3_s2_exclude_pad(x)
        return self.expand(x) if self.expand is not None else x


class MbConvLNBlock(nnx.Module):
    """Pre-norm inverted bottleneck: LN2d → 1×1 (×expand of out) → GELU → dw3×3/s → GELU → 1×1 → + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        mid = int(cout * expand_ratio)
        if stride == 2:
            self.shortcut = Downsample2d(cin, cout, dtype=dtype, rngs=rngs)
        elif cin != cout:
            self.shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs)
        else:
            self.shortcut = None
        self.pre_norm = L.layer_norm(cin, 1e-6, dtype=dtype, rngs=rngs)
        self.conv1_1x1 = _conv(cin, mid, 1, dtype=dtype, rngs=rngs)
        self.conv2_kxk = _conv(mid, mid, 3, stride=stride, groups=mid, dtype=dtype, rngs=rngs)
        self.conv3_1x1 = _conv(mid, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        h = L.gelu(self.conv1_1x1(self.pre_norm(x)))
        h = L.gelu(self.conv2_kxk(h))
        return self.conv3_1x1(h) + shortcut


class StridedConv(nnx.Module):
    """LN2d(1e-6) first, then conv3×3 stride 2 pad 1 to the ViT width."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = L.layer_norm(cin, 1e-6, dtype=dtype, rngs=rngs)
        self.proj = _conv(cin, cout, 3, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(self.norm(x))


class ViTaminEncoder(nnx.Module):
    """Hybrid encoder. `cfg` is the `encoder` block of the UniTok model config."""

    def __init__(
        self,
        cfg,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        drop_path_rate: float = 0.0,
        remat: str = "none",
        scan_blocks: bool = False,
    ):
        self.remat = remat
        widths, depths = tuple(cfg.stage_widths), tuple(cfg.stage_depths)
        self.stem = Stem(3, cfg.stem_width, dtype=dtype, rngs=rngs)
        stages, cin = [], cfg.stem_width
        for width, depth in zip(widths, depths):
            blocks = []
            for d in range(depth):
                blocks.append(
                    MbConvLNBlock(cin, width, 2 if d == 0 else 1, cfg.mbconv_expand_ratio, dtype=dtype, rngs=rngs)
                )
                cin = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.pool = StridedConv(cin, cfg.vit_width, dtype=dtype, rngs=rngs)
        width, heads, ratio = cfg.vit_width, cfg.vit_heads, cfg.mlp_ratio
        self.blocks = BlockStack(
            lambda r: Block(width, heads, ratio, dtype=dtype, rngs=r),
            cfg.vit_depth,
            scan=scan_blocks,
            remat=remat,
            drop_path_rate=drop_path_rate,
            rngs=rngs,
        )
        # timm builds ViTamin with global_pool='avg' as `norm = Identity` (its LayerNorm is `fc_norm`, after
        # pooling): TokenFlow's vitamin_xlarge_256 student/teacher therefore end without a norm (`final_norm=False`).
        self.norm = (
            L.layer_norm(cfg.vit_width, 1e-6, dtype=dtype, rngs=rngs) if getattr(cfg, "final_norm", True) else None
        )

    def __call__(self, images, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, return_intermediates=False):
        """images (b, H, W, 3) → (tokens (b, H/16·W/16, d), (H/16, W/16), intermediates dict or None)."""
        inter = {}
        x = self.stem(images)
        inter["enc_stem"] = x
        call = maybe_remat(lambda blk, h: blk(h), self.remat)
        for s, stage in enumerate(self.stages):
            for blk in stage:
                x = call(blk, x)
            inter[f"enc_stage{s + 1}"] = x
        x = self.pool(x)
        inter["enc_pool"] = x
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # row-major: token n = row·w + col
        x, outs = self.blocks(x, deterministic=deterministic, rngs=rngs, return_all=return_intermediates)
        for i, o in enumerate(outs):
            inter[f"enc_block{i}"] = o
        if self.norm is not None:
            x = self.norm(x)
        inter["encoder_tokens"] = x
        return x, (h, w), (inter if return_intermediates else None)

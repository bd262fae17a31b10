"""UniTok pixel decoder (ViTaminDecoder): ViT blocks + LN on the tokens, then a 4-step conv up-sampler to RGB.

tokens (b, h·w, d) → ViT → LN → (b, h, w, d) → up_conv1 (nearest×2 + conv3×3) → up_conv2 / up_conv3 (inverted
MBConv blocks, the first of each up-samples, with a *full* 3×3 conv at the expanded width) → up_conv4 (InvStem:
nearest×2 + conv, LN2d + GELU, conv3×3 → 3 channels). No output activation (clamp only at inference). The last conv
`up_conv4.conv2` is exposed for the adaptive GAN weight; `__call__` also returns its input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.vit import Block, BlockStack, maybe_remat

# `init_weights(-0.5)` of the official build: every decoder conv xavier-normal with gain 0.5, zero bias.
xavier_normal_gain_half = nnx.initializers.variance_scaling(0.25, "fan_avg", "normal")  # untruncated in jax


def _conv(cin, cout, k, *, rngs, groups=1, dtype=jnp.float32):
    return L.conv2d(cin, cout, k, groups=groups, dtype=dtype, kernel_init=xavier_normal_gain_half, rngs=rngs)


class Upsample2d(nnx.Module):
    """Nearest ×2 up-sampling then conv3×3 pad 1 (official key `<name>.conv`)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(L.nearest_upsample_2x(x))


class InvMbConvLNBlock(nnx.Module):
    """LN2d → 1×1 → GELU → [stride 2: Upsample2d(mid, mid)] → dw3×3 → GELU → 1×1 → + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        mid = int(cout * expand_ratio)
        if stride == 2:
            self.shortcut = Upsample2d(cin, cout, dtype=dtype, rngs=rngs)
        elif cin != cout:
            self.shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs)
        else:
            self.shortcut = None
        self.pre_norm = L.layer_norm(cin, 1e-6, dtype=dtype, rngs=rngs)
        self.conv1_1x1 = _conv(cin, mid, 1, dtype=dtype, rngs=rngs)
        self.up = Upsample2d(mid, mid, dtype=dtype, rngs=rngs) if stride == 2 else None
        self.conv2_kxk = _conv(mid, mid, 3, groups=mid, dtype=dtype, rngs=rngs)
        self.conv3_1x1 = _conv(mid, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        h = L.gelu(self.conv1_1x1(self.pre_norm(x)))
        if self.up is not None:
            h = self.up(h)
        h = L.gelu(self.conv2_kxk(h))
        return self.conv3_1x1(h) + shortcut


class InvStem(nnx.Module):
    """Upsample2d(cin, cin) → LN2d(1e-6) + GELU → conv3×3 cin→cout."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv1 = Upsample2d(cin, cin, dtype=dtype, rngs=rngs)
        self.norm1 = L.layer_norm(cin, 1e-6, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)

    def features(self, x):
        """Input of the last conv."""
        return L.gelu(self.norm1(self.conv1(x)))

    def __call__(self, x):
        return self.conv2(self.features(x))


class PixelDecoder(nnx.Module):
    """`cfg` is the `decoder` block of the UniTok model config (channel_table of 3, inv_mbconv_depths of 2)."""

    def __init__(
        self,
        cfg,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: float = 2.0,
        dtype=jnp.float32,
        drop_path_rate: float = 0.0,
        remat: str = "none",
        scan_blocks: bool = False,
    ):
        self.remat = remat
        self.dtype = dtype
        c0, c1, c2 = tuple(cfg.channel_table)
        d2, d3 = tuple(cfg.inv_mbconv_depths)
        er = cfg.mbconv_expand_ratio
        width, heads = cfg.vit_width, cfg.vit_heads
        self.blocks = BlockStack(
            lambda r: Block(width, heads, mlp_ratio, dtype=dtype, rngs=r),
            cfg.vit_depth,
            scan=scan_blocks,
            remat=remat,
            drop_path_rate=drop_path_rate,
            rngs=rngs,
        )
        self.norm = L.layer_norm(width, 1e-6, dtype=dtype, rngs=rngs)
        self.up_conv1 = Upsample2d(c0, c1, dtype=dtype, rngs=rngs)
        self.up_conv2 = nnx.List(
            [InvMbConvLNBlock(c1, c1, 2 if i == 0 else 1, er, dtype=dtype, rngs=rngs) for i in range(d2)]
        )
        self.up_conv3 = nnx.List(
            [
                InvMbConvLNBlock(c1 if i == 0 else c2, c2, 2 if i == 0 else 1, er, dtype=dtype, rngs=rngs)
                for i in range(d3)
            ]
        )
        self.up_conv4 = InvStem(c2, 3, dtype=dtype, rngs=rngs)

    @property
    def last_conv(self) -> nnx.Conv:
        """The final conv (`decoder.up_conv4.conv2`), whose kernel drives the adaptive GAN weight."""
        return self.up_conv4.conv2

    def __call__(
        self,
        tokens: jax.Array,
        grid_hw: tuple[int, int] | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
    ):
        """tokens (b, h·w, d) → (rec (b, 16h, 16w, 3) float32, input of the last conv, intermediates or None)."""
        b, n, d = tokens.shape
        if grid_hw is None:
            g = math.isqrt(n)
            if g * g != n:
                raise ValueError(f"cannot infer a square token grid from {n} tokens; pass grid_hw")
            grid_hw = (g, g)
        h, w = grid_hw
        inter = {}
        x, outs = self.blocks(
            tokens.astype(self.dtype), deterministic=deterministic, rngs=rngs, return_all=return_intermediates
        )  # no stacked per-block outputs in training
        for i, o in enumerate(outs):
            inter[f"dec_block{i}"] = o
        x = self.norm(x)
        inter["dec_vit"] = x
        x = x.reshape(b, h, w, d)
        x = self.up_conv1(x)
        inter["dec_up_conv1"] = x
        call = maybe_remat(lambda blk, t: blk(t), self.remat)
        for blk in self.up_conv2:
            x = call(blk, x)
        inter["dec_up_conv2"] = x
        for blk in self.up_conv3:
            x = call(blk, x)
        inter["dec_up_conv3"] = x
        last_input = self.up_conv4.features(x)
        rec = self.up_conv4.conv2(last_input).astype(jnp.float32)
        inter["rec"] = rec
        return rec, last_input, (inter if return_intermediates else None)

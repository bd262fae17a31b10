"""LlamaGen / taming VQGAN CNN encoder and decoder (TokenFlow's pixel branch), NHWC.

Building blocks follow LlamaGen `vq_model.py` exactly: GroupNorm(32, eps 1e-6) with two-pass variance, swish,
ResnetBlock (with 1x1 `nin_shortcut` on channel change), single-head AttnBlock over all positions, Downsample =
zero-pad right/bottom by 1 then 3x3 stride-2 VALID conv, Upsample = nearest x2 then 3x3 conv. Attribute names
mirror the PyTorch state-dict (`conv_blocks[l].res[j]`, `mid[i]`, ...) so the converter is mechanical.
The 1x1 quant_conv / post_quant_conv live in the composite (`tokenflow.py`), not here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.parallel import logical_axes as ax


def group_norm(channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
    """torch GroupNorm(32, C, eps=1e-6): two-pass variance (flax's fast E[x^2]-E[x]^2 loses digits)."""
    return nnx.GroupNorm(
        channels,
        num_groups=32,
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=L.partitioned(L.ones, (ax.NORM,)),
        bias_init=L.partitioned(L.zeros, (ax.NORM,)),
        rngs=rngs,
    )


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


# PyTorch's default Conv2d init (kaiming_uniform a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(cin, cout, k, *, rngs, dtype, stride=1, padding=None):
    return L.conv2d(cin, cout, k, stride=stride, padding=padding, dtype=dtype, kernel_init=_torch_conv_init, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = group_norm(cin, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = group_norm(cout, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        # LlamaGen uses a 1x1 nin_shortcut (use_conv_shortcut=False) when channels change.
        self.nin_shortcut = _conv(cin, cout, 1, padding=0, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # dropout p = 0 in every TokenFlow config
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = group_norm(c, dtype=dtype, rngs=rngs)
        self.q = _conv(c, c, 1, padding=0, dtype=dtype, rngs=rngs)
        self.k = _conv(c, c, 1, padding=0, dtype=dtype, rngs=rngs)
        self.v = _conv(c, c, 1, padding=0, dtype=dtype, rngs=rngs)
        self.proj_out = _conv(c, c, 1, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, h * w, c)
        k = self.k(hn).reshape(b, h * w, c)
        v = self.v(hn).reshape(b, h * w, c)
        logits = (jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = _conv(c, c, 3, stride=2, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = _conv(c, c, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(L.nearest_upsample_2x(x))


class _Level(nnx.Module):
    """One resolution level: `res[j]`, optional `attn[j]` after each res block, optional down/upsample."""

    def __init__(self, res, attn, downsample=None, upsample=None):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, h):
        for j, blk in enumerate(self.res):
            h = blk(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class Encoder(nnx.Module):
    """[b, H, W, 3] -> [b, H/2^(L-1), W/2^(L-1), z_channels]. Level 0 is the finest."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        in_channels: int = 3,
        attn_at_last_level: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        n = len(ch_mult)
        self.conv_in = _conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
        in_mult = (1,) + tuple(ch_mult)
        levels = []
        block_in = ch
        for i in range(n):
            block_in = ch * in_mult[i]
            block_out = ch * ch_mult[i]
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, dtype=dtype, rngs=rngs))
                block_in = block_out
                if i == n - 1 and attn_at_last_level:
                    attn.append(AttnBlock(block_in, dtype=dtype, rngs=rngs))
            down = Downsample(block_in, dtype=dtype, rngs=rngs) if i != n - 1 else None
            levels.append(_Level(res, attn, downsample=down))
        self.conv_blocks = nnx.List(levels)
        self.mid = nnx.List(
            [
                ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs),
                AttnBlock(block_in, dtype=dtype, rngs=rngs),
                ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs),
            ]
        )
        self.norm_out = group_norm(block_in, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(block_in, z_channels, 3, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, return_intermediates: bool = False):
        inter = {}
        h = self.conv_in(x.astype(self.dtype))
        for i, level in enumerate(self.conv_blocks):
            h = level(h)
            if level.downsample is not None:
                h = level.downsample(h)
                inter[f"level{i}_down"] = h
            else:
                inter[f"level{i}_out"] = h
        for blk in self.mid:
            h = blk(h)
        inter["mid"] = h
        h = self.conv_out(swish(self.norm_out(h)))
        return (h, inter) if return_intermediates else h


class Decoder(nnx.Module):
    """[b, h, w, z_channels] -> [b, h*2^(L-1), w*2^(L-1), 3]. conv_blocks[0] is the coarsest level.

    With `return_intermediates` also returns 'conv_in', 'mid', 'block{l}_up' and 'last_input' (the input of
    conv_out, for an adaptive GAN weight).
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        out_channels: int = 3,
        attn_at_coarsest_level: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        n = len(ch_mult)
        block_in = ch * ch_mult[n - 1]
        self.conv_in = _conv(z_channels, block_in, 3, dtype=dtype, rngs=rngs)
        self.mid = nnx.List(
            [
                ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs),
                AttnBlock(block_in, dtype=dtype, rngs=rngs),
                ResnetBlock(block_in, block_in, dtype=dtype, rngs=rngs),
            ]
        )
        levels = []
        for i in range(n):
            block_out = ch * ch_mult[n - i - 1]
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, dtype=dtype, rngs=rngs))
                block_in = block_out
                if i == 0 and attn_at_coarsest_level:
                    attn.append(AttnBlock(block_in, dtype=dtype, rngs=rngs))
            up = Upsample(block_in, dtype=dtype, rngs=rngs) if i != n - 1 else None
            levels.append(_Level(res, attn, upsample=up))
        self.conv_blocks = nnx.List(levels)
        self.norm_out = group_norm(block_in, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(block_in, out_channels, 3, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, z: jax.Array, *, return_intermediates: bool = False):
        inter = {}
        h = self.conv_in(z.astype(self.dtype))
        inter["conv_in"] = h
        for blk in self.mid:
            h = blk(h)
        inter["mid"] = h
        for i, level in enumerate(self.conv_blocks):
            h = level(h)
            if level.upsample is not None:
                h = level.upsample(h)
                inter[f"block{i}_up"] = h
        h = swish(self.norm_out(h))
        inter["last_input"] = h
        out = self.conv_out(h).astype(jnp.float32)
        return (out, inter) if return_intermediates else out

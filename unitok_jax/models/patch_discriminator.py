"""A small PatchGAN conv discriminator (pix2pix/taming style) for tiny configs; not UniTok's DINO discriminator.

NHWC images in [-1, 1] -> conv 4x4 s2 -> LeakyReLU(0.2)
  -> (num_layers - 1) x [conv 4x4 s2 -> GroupNorm -> LeakyReLU]   (channels double each time, capped at 8 * width)
  -> conv 4x4 s1 -> GroupNorm -> LeakyReLU -> conv 4x4 s1 -> 1 channel.
All convs use symmetric padding 1. Output logits [b, m] with m = h' * w' patches (row-major). For a 64 x 64 input,
width 32 and num_layers 3 that is 64 -> 32 -> 16 -> 8 -> 7 -> 6, i.e. m = 36.

Same call signature as `DinoDiscriminator`: `__call__(images, *, rngs_or_key=None)`; the key is unused (deterministic).
Conv kernels are N(0, 0.02), biases zero, GroupNorm 1 / 0. All weights are trainable `nnx.Param`s.

Config fields (mapping or ConfigDict; all optional):
  width        int   channels of the first conv (64).
  num_layers   int   number of stride-2 convs (3); >= 1.
  norm_groups  int   GroupNorm groups (32, reduced to gcd(groups, channels) when a layer has fewer channels).
  norm_eps     float GroupNorm eps (1e-6).
  dtype        str   compute dtype 'float32' (default) or 'bfloat16'.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import layers
from unitok_jax.models.dino_discriminator import _cfg_get, _dtype, group_norm


class PatchDiscriminator(nnx.Module):
    def __init__(self, cfg: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs):
        width = int(_cfg_get(cfg, "width", 64))
        num_layers = int(_cfg_get(cfg, "num_layers", 3))
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator needs num_layers >= 1, got {num_layers}")
        groups = int(_cfg_get(cfg, "norm_groups", 32))
        eps = float(_cfg_get(cfg, "norm_eps", 1e-6))
        dtype = _dtype(_cfg_get(cfg, "dtype", "float32"))
        init = nnx.initializers.normal(0.02)

        def conv(cin, cout, stride):
            return layers.conv2d(cin, cout, 4, stride=stride, padding=1, rngs=rngs, dtype=dtype, kernel_init=init)

        def norm(c):
            return group_norm(c, math.gcd(groups, c), eps, rngs=rngs)

        chans = [min(width * 2**i, width * 8) for i in range(num_layers + 1)]
        self.stem = conv(3, chans[0], 2)
        self.down_convs = nnx.List([conv(chans[i - 1], chans[i], 2) for i in range(1, num_layers)])
        self.down_norms = nnx.List([norm(chans[i]) for i in range(1, num_layers)])
        self.mid_conv = conv(chans[num_layers - 1], chans[num_layers], 1)
        self.mid_norm = norm(chans[num_layers])
        self.out = conv(chans[num_layers], 1, 1)

    def __call__(self, images: jax.Array, *, rngs_or_key=None) -> jax.Array:
        del rngs_or_key  # deterministic
        x = images.astype(self.stem.dtype or jnp.float32)
        x = jax.nn.leaky_relu(self.stem(x), 0.2)
        for conv, norm in zip(self.down_convs, self.down_norms):
            x = jax.nn.leaky_relu(norm(conv(x).astype(jnp.float32)), 0.2).astype(x.dtype)
        x = jax.nn.leaky_relu(self.mid_norm(self.mid_conv(x).astype(jnp.float32)), 0.2).astype(x.dtype)
        logits = self.out(x).astype(jnp.float32)  # [b, h', w', 1]
        return logits.reshape(logits.shape[0], -1)

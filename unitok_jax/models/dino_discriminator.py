"""UniTok's GAN discriminator: frozen DINOv2 features at a few depths, one small trainable Conv1d head per depth.

Follows `models/discrim.py`. Forward on NHWC images in [-1, 1]:
  1. ImageNet normalisation in fp32: x * 0.5 / std + (0.5 - mean) / std.
  2. Size to a multiple of the patch size S = (H // p) * p: if H > S and W > S, a coin flip per call (probability 1/2
     each, from the `rngs_or_key` argument) between one random S x S crop for the whole batch (torchvision RandomCrop)
     and an area (adaptive-average) resize to S; otherwise a PyTorch-bicubic resize to S (identity when H == S).
     Without a key the forward is deterministic and uses the area resize.
  3. Frozen DINOv2, raw outputs of blocks `taps` (default (0, 2, 5, 8, 11)); per tap: patch tokens + class token
     broadcast-added -> [b, n, d].
  4. Head per tap (tokens are the Conv1d sequence axis): Conv1d(d, d, k=1) -> GroupNorm(32, eps 1e-6) -> LeakyReLU(0.2)
     -> residual block {Conv1d(d, d, k=9, circular padding) -> GN -> LReLU; out = (f(x) + x) / sqrt(2)} -> Conv1d(d, 1, k=1).
  5. Logits [b, len(taps) * n], taps in order, tokens row-major (n = 324 for 252 x 252 input with patch 14).
Head init: every Conv1d xavier-normal with gain 0.5 and zero bias; GN weight 1, bias 0.

Trainable vs frozen. All DINOv2 weights are `FrozenParam` (see `dinov2.freeze`), a Variable type distinct from
`nnx.Param`; the heads hold ordinary `nnx.Param`s. Hence:
    trainable = nnx.state(disc, nnx.Param)                  # heads only
    frozen    = nnx.state(disc, dinov2.FrozenParam)         # the DINOv2 backbone
    graphdef, trainable, rest = nnx.split(disc, nnx.Param, ...)   # `rest` carries the frozen DINO weights
No gradient reaches DINOv2 through `rest` when the loss is differentiated with respect to `trainable` only; the input
image still receives gradients through the frozen network (needed for the generator's GAN loss).

Config fields (an `ml_collections.ConfigDict` or any mapping; all optional):
  dino_path    str   path to `dinov2_vits14_pretrain.pth` (or a .npz, or a {key: array} state dict);
                     '' or None = randomly initialised DINO (tests / smoke runs only).
  dino_depth   int   number of DINOv2 blocks (12).
  width        int   DINOv2 width d, also the head width (384).
  dino_heads   int   attention heads (width // 64).
  patch_size   int   DINOv2 patch (14).
  pretrain_grid int  side of the checkpoint's positional table (37 = 518 / 14).
  taps         tuple block indices to read (default: those of (0, 2, 5, 8, 11) below dino_depth).
  kernel_size  int   kernel of the circular Conv1d in the residual block (9).
  norm_groups  int   GroupNorm groups (32; width must be divisible by it).
  norm_eps     float GroupNorm eps (1e-6).
  dtype        str   compute dtype of DINO and heads, 'float32' (default) or 'bfloat16'.
When `dino_path` is given the architecture fields must match the checkpoint (a ValueError lists the differences).
Loading happens at construction; under `jax.jit`/`nnx.eval_shape` construction the weights become constants, so
build the real discriminator eagerly (or load weights into an eagerly built one with `load_dino_weights`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax.models import bicubic, dinov2, layers
from unitok_jax.parallel import logical_axes as ax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TAPS = (0, 2, 5, 8, 11)


def _cfg_get(cfg: Mapping[str, Any] | None, name: str, default):
    if cfg is None:
        return default
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def _dtype(name) -> Any:
    if not isinstance(name, str):
        return name
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def xavier_normal(gain: float):
    """torch.nn.init.xavier_normal_ (untruncated normal, std = gain * sqrt(2 / (fan_in + fan_out)))."""
    return nnx.initializers.variance_scaling(gain**2, "fan_avg", "normal")


def conv1d(in_ch: int, out_ch: int, kernel_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32, gain: float = 0.5):
    """Conv1d on [b, L, C] with VALID padding (circular padding is applied by the caller). Kernel (k, in, out)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel_size,),
        padding="VALID",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.partitioned(xavier_normal(gain), (None, ax.CONV_IN, ax.CONV_OUT)),
        bias_init=layers.partitioned(layers.zeros, (ax.CONV_OUT,)),
        rngs=rngs,
    )


def circular_pad(x: jax.Array, pad: int, axis: int = 1) -> jax.Array:
    """Wrap-around padding along the token axis (PyTorch padding_mode='circular')."""
    if pad == 0:
        return x
    return jnp.pad(x, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)], mode="wrap")


def group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
    """torch.nn.GroupNorm(groups, channels, eps) on channels-last input; statistics over (tokens, channels-in-group)."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=layers.partitioned(layers.ones, (ax.NORM,)),
        bias_init=layers.partitioned(layers.zeros, (ax.NORM,)),
        rngs=rngs,
    )


class ConvBlock1d(nnx.Module):
    """Conv1d (circular padding k // 2) -> GroupNorm -> LeakyReLU(0.2)."""

    def __init__(self, channels: int, kernel_size: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.pad = kernel_size // 2
        self.conv = conv1d(channels, channels, kernel_size, rngs=rngs, dtype=dtype)
        self.norm = group_norm(channels, groups, eps, rngs=rngs, dtype=jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(circular_pad(x, self.pad))
        # Normalisation statistics in fp32 whatever the compute dtype.
        y = self.norm(y.astype(jnp.float32))
        return jax.nn.leaky_relu(y, 0.2).astype(x.dtype)


class DiscHead(nnx.Module):
    """[b, n, d] tokens -> [b, n] logits."""

    def __init__(self, channels: int, kernel_size: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.block = ConvBlock1d(channels, 1, groups, eps, rngs=rngs, dtype=dtype)
        self.residual = ConvBlock1d(channels, kernel_size, groups, eps, rngs=rngs, dtype=dtype)
        self.out = conv1d(channels, 1, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block(x)
        x = (self.residual(x) + x) * (1.0 / math.sqrt(2.0))
        return self.out(x)[..., 0].astype(jnp.float32)


def _split_key(rngs_or_key):
    if rngs_or_key is None:
        return None
    if isinstance(rngs_or_key, nnx.Rngs):
        return rngs_or_key()  # the Rngs' default stream
    return rngs_or_key


class DinoDiscriminator(nnx.Module):
    """`__call__(images_nhwc_in_[-1, 1], *, rngs_or_key=None) -> logits [b, len(taps) * n]`."""

    def __init__(self, cfg: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs):
        width = int(_cfg_get(cfg, "width", 384))
        depth = int(_cfg_get(cfg, "dino_depth", 12))
        dino_cfg = dinov2.DinoV2Config(
            patch_size=int(_cfg_get(cfg, "patch_size", 14)),
            dim=width,
            depth=depth,
            heads=int(_cfg_get(cfg, "dino_heads", max(1, width // 64))),
            pretrain_grid=int(_cfg_get(cfg, "pretrain_grid", 37)),
        )
        taps = _cfg_get(cfg, "taps", None) or tuple(t for t in DEFAULT_TAPS if t < depth)
        self.taps = tuple(int(t) for t in taps)
        if not self.taps or max(self.taps) >= depth:
            raise ValueError(f"discriminator taps {self.taps} must be non-empty and < dino_depth={depth}")
        dtype = _dtype(_cfg_get(cfg, "dtype", "float32"))
        path = _cfg_get(cfg, "dino_path", "")
        if path:
            # Built abstractly and then filled: no random init of weights that are overwritten anyway.
            self.dino = nnx.eval_shape(lambda: dinov2.DinoV2(dino_cfg, rngs=nnx.Rngs(0), dtype=dtype))
            self.load_dino_weights(path)
        else:
            self.dino = dinov2.DinoV2(dino_cfg, rngs=rngs, dtype=dtype)
        dinov2.freeze(self.dino)
        groups = int(_cfg_get(cfg, "norm_groups", 32))
        eps = float(_cfg_get(cfg, "norm_eps", 1e-6))
        k = int(_cfg_get(cfg, "kernel_size", 9))
        self.heads = nnx.List([DiscHead(width, k, groups, eps, rngs=rngs, dtype=dtype) for _ in self.taps])

    def load_dino_weights(self, path_or_state_dict) -> None:
        dinov2.load_dinov2_weights(self.dino, path_or_state_dict)

    def preprocess(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
        """ImageNet-normalise and bring H, W to multiples of the patch size (crop-or-area coin flip, see module doc)."""
        x = images.astype(jnp.float32)
        std, mean = np.asarray(IMAGENET_STD, np.float32), np.asarray(IMAGENET_MEAN, np.float32)
        x = x * jnp.asarray(0.5 / std) + jnp.asarray((0.5 - mean) / std)
        _, h, w, _ = x.shape
        p = self.dino.cfg.patch_size
        sh, sw = (h // p) * p, (w // p) * p
        if h > sh and w > sw:
            area = bicubic.area_resize(x, (sh, sw))
            if key is None:
                return area
            k_coin, k_h, k_w = jax.random.split(key, 3)
            top = jax.random.randint(k_h, (), 0, h - sh + 1)
            left = jax.random.randint(k_w, (), 0, w - sw + 1)
            crop = jax.lax.dynamic_slice(x, (0, top, left, 0), (x.shape[0], sh, sw, x.shape[3]))
            return jnp.where(jax.random.bernoulli(k_coin, 0.5), crop, area)
        if (h, w) == (sh, sw):
            return x
        return bicubic.bicubic_resize(x, (sh, sw))

    def features(self, images: jax.Array, *, rngs_or_key=None) -> list[jax.Array]:
        """Per tap [b, n, d] = raw block patch tokens + class token (fp32)."""
        x = self.preprocess(images, _split_key(rngs_or_key))
        feats = self.dino.intermediate_layers(x, self.taps, norm=False)
        return [patch.astype(jnp.float32) + cls.astype(jnp.float32)[:, None, :] for patch, cls in feats]

    def __call__(self, images: jax.Array, *, rngs_or_key=None) -> jax.Array:
        feats = self.features(images, rngs_or_key=rngs_or_key)
        return jnp.concatenate([head(f) for head, f in zip(self.heads, feats)], axis=1)


def trainable_and_frozen(disc: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(trainable heads = nnx.Param, frozen backbone = FrozenParam) states of a discriminator."""
    return nnx.state(disc, nnx.Param), nnx.state(disc, dinov2.FrozenParam)

"""DINOv2 ViT (S/14 by default) as a frozen feature extractor for the GAN discriminator; no training, no hub download.

Matches `facebookresearch/dinov2` `vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)` as used by
UniTok's `models/discrim.py`: conv patch embedding (patch 14), class token, learned positional table for a 37x37 grid,
12 pre-norm blocks (LN eps 1e-6, fused qkv attention with 6 heads, LayerScale, MLP 4x with exact GELU), final LN.
Inputs are NHWC and already ImageNet-normalised.

Positional embedding for other grids: PyTorch bicubic (a = -0.75, clamped borders, no antialias) driven by the
*scale factor* (g + 0.1) / 37 (DINOv2's `interpolate_offset` = 0.1), which is not the same as resizing to size g.
It is computed inside the forward from the static input grid via `unitok_jax.models.bicubic.interpolate_pos_table`
(two small constant [g, 37] matrices built once per shape at trace time), so any input size that is a multiple of the
patch size works; for 252x252 inputs this is the 37x37 -> 18x18 table UniTok uses. Identity when the grid is 37x37.

`intermediate_layers(x, taps)` returns the *raw* outputs of the selected blocks (no final norm), split into patch tokens
and class token, like `get_intermediate_layers(..., return_class_token=True, norm=False)`; blocks after the last tap
are not run.

Weights: `load_dinov2(path_or_state_dict, ...)` reads `dinov2_vits14_pretrain.pth` (keys `cls_token`, `pos_embed`,
`mask_token`, `patch_embed.proj.{weight,bias}`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}.*`, `norm.*`), strictly. `freeze(module)` turns every `nnx.Param` inside into `FrozenParam`, so
`nnx.state(parent, nnx.Param)` / `nnx.split(parent, nnx.Param, ...)` never see DINO weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax.models import layers
from unitok_jax.models.bicubic import interpolate_pos_table
from unitok_jax.parallel import logical_axes as ax


class FrozenParam(nnx.Variable):
    """A pretrained weight that is never optimised (kept out of `nnx.Param` filters and optimizer states)."""


def freeze(module: nnx.Module) -> nnx.Module:
    """Replace every `nnx.Param` inside `module` (recursively) by a `FrozenParam` with the same value and metadata."""
    for _, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if type(value) is nnx.Param:  # noqa: E721 - exact type: do not touch subclasses
                    setattr(node, name, FrozenParam(value.get_value(), **value.get_metadata()))
    return module


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    patch_size: int = 14
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    pretrain_grid: int = 37  # the checkpoint's positional table is for 518 / 14 = 37 patches per side
    interpolate_offset: float = 0.1
    layerscale_init: float = 1.0
    eps: float = 1e-6

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


VITS14 = DinoV2Config()


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads = heads
        self.qkv = layers.dense(dim, 3 * dim, axes=(ax.EMBED, ax.HEADS), rngs=rngs, dtype=dtype)
        self.proj = layers.dense(dim, dim, axes=(ax.HEADS, ax.EMBED), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)  # rows [q; k; v], head-major inside each
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd**-0.5)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return self.proj(out)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32), out_sharding=(ax.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = layers.dense(dim, hidden, axes=(ax.EMBED, ax.MLP), rngs=rngs, dtype=dtype)
        self.fc2 = layers.dense(hidden, dim, axes=(ax.MLP, ax.EMBED), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = layers.layer_norm(cfg.dim, cfg.eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(cfg.dim, cfg.heads, rngs=rngs, dtype=dtype)
        self.ls1 = LayerScale(cfg.dim, cfg.layerscale_init)
        self.norm2 = layers.layer_norm(cfg.dim, cfg.eps, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, rngs=rngs, dtype=dtype)
        self.ls2 = LayerScale(cfg.dim, cfg.layerscale_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nnx.Module):
    """DINOv2 ViT; `intermediate_layers(x, taps)` -> [(patch_tokens [b, n, d], class_token [b, d]), ...]."""

    def __init__(self, cfg: DinoV2Config = VITS14, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.patch_embed = layers.conv2d(3, d, p, stride=p, padding=0, rngs=rngs, dtype=dtype)
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d)), out_sharding=(None, None, ax.EMBED))
        self.pos_embed = nnx.Param(
            init(rngs.params(), (1, 1 + cfg.pretrain_grid**2, d)), out_sharding=(None, None, ax.EMBED)
        )
        self.mask_token = nnx.Param(jnp.zeros((1, d)), out_sharding=(None, ax.EMBED))  # unused (iBOT masking)
        self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])
        self.norm = layers.layer_norm(d, cfg.eps, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def pos_embed_for(self, grid_h: int, grid_w: int) -> jax.Array:
        """[1, 1 + gh*gw, d] positional table for a gh x gw patch grid (class position kept as is)."""
        pos = self.pos_embed[...].astype(jnp.float32)
        if self.cfg.interpolate_offset != 0.1:
            raise NotImplementedError("only DINOv2's interpolate_offset = 0.1 is implemented")
        patch = interpolate_pos_table(pos[0, 1:], (grid_h, grid_w))
        return jnp.concatenate([pos[:, :1], patch[None]], axis=1)

    def prepare_tokens(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p}")
        t = self.patch_embed(x.astype(self.dtype))  # [b, h/p, w/p, d]
        gh, gw = t.shape[1], t.shape[2]
        t = t.reshape(b, gh * gw, -1)  # row-major token order, as torch flatten(2)
        cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (b, 1, t.shape[-1]))
        t = jnp.concatenate([cls, t], axis=1)
        return t + self.pos_embed_for(gh, gw).astype(t.dtype)

    def intermediate_layers(
        self, x: jax.Array, taps: Sequence[int], *, norm: bool = False
    ) -> list[tuple[jax.Array, jax.Array]]:
        taps = tuple(int(t) for t in taps)
        if not taps or min(taps) < 0 or max(taps) >= self.cfg.depth:
            raise ValueError(f"taps {taps} must lie in [0, {self.cfg.depth})")
        t = self.prepare_tokens(x)
        outs = []
        for i, block in enumerate(self.blocks):
            if i > max(taps):
                break
            t = block(t)
            if i in taps:
                o = self.norm(t) if norm else t
                outs.append((o[:, 1:], o[:, 0]))
        return outs

    def __call__(self, x: jax.Array) -> jax.Array:
        """Final normalised tokens [b, 1 + n, d] (class token first)."""
        t = self.prepare_tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def expected_dinov2_keys(cfg: DinoV2Config) -> dict[str, tuple[int, ...]]:
    d, p, m = cfg.dim, cfg.patch_size, cfg.mlp_dim
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + cfg.pretrain_grid**2, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        keys.update(
            {
                pre + "norm1.weight": (d,),
                pre + "norm1.bias": (d,),
                pre + "attn.qkv.weight": (3 * d, d),
                pre + "attn.qkv.bias": (3 * d,),
                pre + "attn.proj.weight": (d, d),
                pre + "attn.proj.bias": (d,),
                pre + "ls1.gamma": (d,),
                pre + "norm2.weight": (d,),
                pre + "norm2.bias": (d,),
                pre + "mlp.fc1.weight": (m, d),
                pre + "mlp.fc1.bias": (m,),
                pre + "mlp.fc2.weight": (d, m),
                pre + "mlp.fc2.bias": (d,),
                pre + "ls2.gamma": (d,),
            }
        )
    return keys


def config_from_state_dict(sd, *, heads: int | None = None) -> DinoV2Config:
    """Architecture read off the tensor shapes; heads are not recoverable from shapes (default dim // 64)."""
    d = int(np.shape(sd["cls_token"])[-1])
    p = int(np.shape(sd["patch_embed.proj.weight"])[-1])
    n = int(np.shape(sd["pos_embed"])[1]) - 1
    g = int(round(np.sqrt(n)))
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    m = int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]) if depth else 4 * d
    return DinoV2Config(
        patch_size=p, dim=d, depth=depth, heads=heads or max(1, d // 64), mlp_ratio=m / d, pretrain_grid=g
    )


def _read(path_or_state_dict) -> dict[str, np.ndarray]:
    if isinstance(path_or_state_dict, (str, os.PathLike)) and os.fspath(path_or_state_dict).endswith(".npz"):
        with np.load(os.fspath(path_or_state_dict)) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    from unitok_jax import torch_io

    return torch_io.load_state_dict(path_or_state_dict, subkeys=("model", "teacher", "state_dict"))


def load_dinov2_weights(model: DinoV2, path_or_state_dict) -> DinoV2:
    """Copy a DINOv2 state dict into `model` (strict: missing / unexpected / mis-shaped keys raise ValueError)."""
    sd = _read(path_or_state_dict)
    cfg = model.cfg
    want = expected_dinov2_keys(cfg)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [
        f"{k}: got {tuple(np.shape(v))}, expected {want[k]}"
        for k, v in sd.items()
        if k in want and tuple(np.shape(v)) != want[k]
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"DINOv2 state dict does not match {cfg}:"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  wrong shapes: {wrong}" if wrong else "")
        )
    f = lambda k: jnp.asarray(np.asarray(sd[k], np.float32))  # noqa: E731
    lin = lambda k: jnp.asarray(np.asarray(sd[k], np.float32).T)  # noqa: E731  (out, in) -> (in, out)
    # set_value (not `v[...] =`) so that an abstract model from nnx.eval_shape can be filled without a random init.
    model.cls_token.set_value(f("cls_token"))
    model.pos_embed.set_value(f("pos_embed"))
    model.mask_token.set_value(f("mask_token"))
    model.patch_embed.kernel.set_value(
        jnp.asarray(np.asarray(sd["patch_embed.proj.weight"], np.float32).transpose(2, 3, 1, 0))
    )
    model.patch_embed.bias.set_value(f("patch_embed.proj.bias"))
    model.norm.scale.set_value(f("norm.weight"))
    model.norm.bias.set_value(f("norm.bias"))
    for i, blk in enumerate(model.blocks):
        pre = f"blocks.{i}."
        for mod, name in ((blk.norm1, "norm1"), (blk.norm2, "norm2")):
            mod.scale.set_value(f(pre + name + ".weight"))
            mod.bias.set_value(f(pre + name + ".bias"))
        for mod, name in (
            (blk.attn.qkv, "attn.qkv"),
            (blk.attn.proj, "attn.proj"),
            (blk.mlp.fc1, "mlp.fc1"),
            (blk.mlp.fc2, "mlp.fc2"),
        ):
            mod.kernel.set_value(lin(pre + name + ".weight"))
            mod.bias.set_value(f(pre + name + ".bias"))
        blk.ls1.gamma.set_value(f(pre + "ls1.gamma"))
        blk.ls2.gamma.set_value(f(pre + "ls2.gamma"))
    return model


def load_dinov2(path_or_state_dict, *, heads: int | None = None, dtype=jnp.float32, frozen: bool = True) -> DinoV2:
    """Build a DINOv2 whose architecture is read from the state dict, load it, and (by default) freeze it."""
    sd = _read(path_or_state_dict)
    cfg = config_from_state_dict(sd, heads=heads)
    # Abstract construction: every weight is overwritten, so skip the random init of ~22 M parameters.
    model = nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    load_dinov2_weights(model, sd)
    return freeze(model) if frozen else model

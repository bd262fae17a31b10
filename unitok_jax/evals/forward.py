"""The jitted eval forward: a tokenizer's reconstruction, metrics, codes and CLIP features for one batch.

`run_evals` takes a model as an nnx module (CLI, colabs: host-local params) or as the trainer holds it,
(graphdef, params, rest) with mesh-sharded params; `split_model` and `params_mesh` tell the two apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.evals.image_metrics import reconstruction_metrics
from unitok_jax.parallel import sharding as shd

# Rank of each output: the trainer's mesh shards them along the batch, so each process reads only its own rows.
_OUT_NDIM = {"rec": 4, "psnr": 1, "ssim": 1, "indices": 3, "img": 2, "txt": 2, "lpips": 1}


def split_model(model):
    """(graphdef, params, rest) from an nnx module or a (graphdef, params, rest) tuple."""
    if isinstance(model, nnx.Module):
        return nnx.split(model, nnx.Param, ...)
    if isinstance(model, (tuple, list)) and len(model) == 3:
        graphdef, params, rest = model
        return graphdef, params, rest
    raise TypeError(f"model must be an nnx.Module or (graphdef, params, rest), got {type(model).__name__}")


def params_mesh(params):
    """The mesh of sharded global params (trainer), or None for host-local params (CLI)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
        if not getattr(leaf, "is_fully_addressable", True):
            raise ValueError("params span several processes but are not NamedSharding-ed; pass mesh-sharded params")
        return None
    return None


@functools.lru_cache(maxsize=8)
def forward_fn(graphdef, lpips_graphdef, with_text: bool, mesh=None, has_clip_head: bool = True):
    """The jitted eval forward, cached (graphdefs are hashable) so periodic evals compile once. `has_clip_head`:
    the model's (it fixes the outputs' shardings before tracing)."""
    return _make_forward_fn(graphdef, lpips_graphdef, with_text, mesh, has_clip_head)


def _make_forward_fn(graphdef, lpips_graphdef, with_text: bool, mesh, has_clip_head: bool):
    def forward(params, rest, lpips_state, images, text):
        model = nnx.merge(graphdef, params, rest)
        rec, aux = model(images, text if with_text else None, deterministic=True)
        rec = jnp.clip(rec.astype(jnp.float32), -1.0, 1.0)
        metrics = reconstruction_metrics(images, rec)
        out = {"rec": rec, "psnr": metrics["psnr"], "ssim": metrics["ssim"], "indices": model.codes(aux)}
        if model.has_clip_head:
            out["img"] = aux["clip_image_features"].astype(jnp.float32)
        if with_text:
            out["txt"] = aux["clip_text_features"].astype(jnp.float32)
        if lpips_graphdef is not None:
            out["lpips"] = nnx.merge(lpips_graphdef, lpips_state)(images.astype(jnp.float32), rec)
        return out

    if mesh is None:
        return jax.jit(forward)
    keys = (
        ["rec", "psnr", "ssim", "indices"]
        + (["img"] if has_clip_head else [])
        + (["txt"] if with_text else [])
        + (["lpips"] if lpips_graphdef is not None else [])
    )
    return jax.jit(forward, out_shardings={k: shd.batch_sharding(mesh, _OUT_NDIM[k]) for k in keys})


@functools.lru_cache(maxsize=8)
def encode_text_fn(graphdef):
    """Jitted `model.encode_text(ids)` in float32 (the zero-shot classifier's prompts)."""

    def encode(params, rest, ids):
        return nnx.merge(graphdef, params, rest).encode_text(ids).astype(jnp.float32)

    return jax.jit(encode)

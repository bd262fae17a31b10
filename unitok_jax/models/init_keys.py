"""Stand-ins for `nnx.Rngs` while a model is constructed, and a fast numpy filler for demo/test params.

`nnx.Rngs` bumps a counter Variable per draw; under tracing (jit / eval_shape) each bump costs O(trace length) in
flax 0.12 (a sharding probe on the tracer walks the jaxpr), so tracing an init becomes quadratic. UniTok's towers
use `models/vit.InitKeys` (chunked splits); TokenFlow uses `KeySeq` (fold_in per draw: its released init numbers);
`ShapeOnlyRngs` serves `nnx.eval_shape` when every param is filled afterwards (converter, `numpy_fill_`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class KeySeq:
    """Duck-typed stand-in for `nnx.Rngs` during construction: one draw from the caller's Rngs, then
    fold_in(key, i) per parameter with a Python counter. A real Rngs bumps a counter Variable per draw and, when
    construction is traced (jit / eval_shape), flax compares the traced counter's `.sharding`, whose error path
    walks the whole trace: init becomes quadratic (~15 s for the tiny model). Flax layers only call
    `rngs.params()` at construction, which this provides."""

    def __init__(self, key: jax.Array):
        self._key = key
        self._count = 0

    def _next(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)

    params = dropout = default = _next

    def __call__(self) -> jax.Array:
        return self._next()


def as_keyseq(rngs) -> KeySeq:
    if isinstance(rngs, nnx.Rngs):
        return KeySeq(rngs.params())
    return rngs  # already a KeySeq-like object (e.g. the converter's shape-only stand-in)


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` inside `nnx.eval_shape`: every stream returns the same key, nothing is counted
    (shapes only; see `KeySeq` for why a real Rngs is slow under tracing)."""

    def __init__(self):
        self._key = jax.random.key(0)

    def _draw(self) -> jax.Array:
        return self._key

    params = dropout = default = _draw

    def __call__(self) -> jax.Array:
        return self._key


def numpy_fill_(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fill every Param of `module` (abstract or not) in place from a host numpy RNG: fast, for tests and smoke
    runs, NOT the official init distributions. Kernels ~ N(0, 1/fan_in), norm scales 1 + 0.1 N, codebook rows
    N(0, 1), positional/class tables 0.02 N, other vectors (biases) 0.05 N, CLIP `proj` N(0, 1/rows)."""
    rng = np.random.default_rng(seed)
    _, params = nnx.split(module, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        shape = tuple(var.get_value().shape)
        name = path[-1]
        if name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(int(np.prod(shape[:-1])))
        elif name == "scale":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name in ("embedding_sem", "embedding_pix", "codebooks"):
            v = rng.normal(size=shape)
        elif name in ("positional_embedding", "pos_embed", "cls_token", "class_embedding"):
            v = 0.02 * rng.normal(size=shape)
        elif name == "proj":
            v = rng.normal(size=shape) / np.sqrt(shape[0])
        else:
            v = 0.05 * rng.normal(size=shape)
        var.set_value(jnp.asarray(v, jnp.float32))
    return module

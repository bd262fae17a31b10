"""Transformer pieces shared by the UniTok encoder, decoder, projections and text tower.

What is here: softmax attention on (b, n, h, hd) tensors, timm's pre-norm ViT `Block` with a fused qkv Linear and
the ViTamin GeGLU MLP (its own inner LayerNorm, tanh-GELU on w0 only), and `BlockStack`, which runs a stack of
blocks either as a Python loop or as one `nnx.scan` over vmap-stacked parameters, with optional remat and linearly
increasing stochastic depth. What is not here: positional embeddings (UniTok's ViTs have none).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.parallel import logical_axes as ax

REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_policy(name: str):
    """Map a config string to a jax.checkpoint policy (None = save nothing, recompute everything)."""
    if name == "full":
        return None
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {name!r}")


def maybe_remat(fn: Callable, remat: str) -> Callable:
    """Wrap `fn(module, *args)` in nnx.remat unless remat == 'none'."""
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=remat_policy(remat))


class InitKeys:
    """Stateless stand-in for nnx.Rngs while constructing a model: each stream call (`.params()`, `.dropout()`, ...)
    returns the next key of a deterministic sequence derived from base_key with a Python counter.

    Why: nnx.Rngs bumps a counter Variable per call, and under tracing (nnx.eval_shape, jit(init)) each bump costs
    O(length of the trace so far) in flax 0.12.8 / jax 0.10.2 (a sharding probe on the tracer builds an error
    message by walking the jaxpr), so tracing the init of the unscanned 820M model took ~85 s instead of ~4 s.
    """

    _CHUNK = 256  # keys are drawn by one split per chunk: far fewer threefry ops to compile than a fold_in per key

    def __init__(self, key: jax.Array):
        self._key = key
        self._count = 0
        self._chunk = None

    @classmethod
    def from_rngs(cls, rngs) -> "InitKeys":
        return rngs if isinstance(rngs, InitKeys) else cls(rngs.params())

    def _next(self) -> jax.Array:
        i, self._count = self._count, self._count + 1
        if i % self._CHUNK == 0:
            self._chunk = jax.random.split(jax.random.fold_in(self._key, i // self._CHUNK), self._CHUNK)
        return self._chunk[i % self._CHUNK]

    def __call__(self) -> jax.Array:
        return self._next()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._next


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    precision: jax.lax.Precision | None = None,
) -> jax.Array:
    """softmax(q kᵀ/√hd [+ causal mask]) v on (b, n, h, hd) tensors; logits and softmax in float32."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=precision).astype(jnp.float32) * scale
    if causal:
        n, m = logits.shape[-2:]
        future = jnp.arange(m)[None, :] > jnp.arange(n)[:, None]
        logits = jnp.where(future, -jnp.inf, logits)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", weights, v, precision=precision)


class Attention(nnx.Module):
    """timm Attention: fused qkv Linear (rows [q; k; v], head-major), full softmax attention, output Linear."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, precision=None):
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.precision = precision
        self.qkv = L.dense(dim, 3 * dim, axes=(ax.EMBED, ax.HEADS), dtype=dtype, precision=precision, rngs=rngs)
        self.proj = L.dense(dim, dim, axes=(ax.HEADS, ax.EMBED), dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        o = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], precision=self.precision)
        return self.proj(o.reshape(b, n, d))


class GeGluMlp(nnx.Module):
    """ViTamin GeGluMlp: LN(eps) → tanh-GELU(w0 x) ⊙ (w1 x) → w2. The LN is the MLP's own (a second one)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        precision=None,
        in_axis: str | None = ax.EMBED,
    ):
        self.norm = L.layer_norm(dim, norm_eps, dtype=dtype, rngs=rngs)
        self.w0 = L.dense(dim, hidden, axes=(in_axis, ax.MLP), dtype=dtype, precision=precision, rngs=rngs)
        self.w1 = L.dense(dim, hidden, axes=(in_axis, ax.MLP), dtype=dtype, precision=precision, rngs=rngs)
        self.w2 = L.dense(hidden, dim, axes=(ax.MLP, in_axis), dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        return self.w2(L.gelu_tanh(self.w0(x)) * self.w1(x))


class Block(nnx.Module):
    """timm pre-norm ViT block (LN eps 1e-6) with GeGLU MLP; no layer-scale, no qk-norm."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = L.layer_norm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm2 = L.layer_norm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.mlp = GeGluMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, drop_rate=0.0, key: jax.Array | None = None) -> jax.Array:
        k1 = k2 = None
        if key is not None:
            k1, k2 = jax.random.split(key)
        x = x + _drop_path(self.attn(self.norm1(x)), drop_rate, k1)
        x = x + _drop_path(self.mlp(self.norm2(x)), drop_rate, k2)
        return x


def _drop_path(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """layers.drop_path driven by an explicit key (None = deterministic); `rate` may be traced."""
    if key is None:
        return x
    return L.drop_path(x, rate, deterministic=False, rngs=nnx.Rngs(dropout=key))


class BlockStack(nnx.Module):
    """`depth` blocks made by `make_block(rngs)`, run as a loop (params in an nnx.List) or as one scan.

    With `scan=True` the block parameters are created under nnx.vmap, so every leaf gets a leading `depth` axis
    (logical axis None) and compile time does not grow with depth. Blocks are called as
    `block(x, drop_rate, key)`; rates grow linearly 0 → drop_path_rate (timm). `remat` in REMAT_POLICIES wraps
    each block call in nnx.remat.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        depth: int,
        *,
        rngs: nnx.Rngs,
        scan: bool = False,
        remat: str = "none",
        drop_path_rate: float = 0.0,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
        self.depth = depth
        self.scan = scan
        self.remat = remat
        self.drop_path_rate = float(drop_path_rate)
        self.drop_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth)) if depth else ()
        if scan:

            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def create(key):
                return make_block(InitKeys(key))

            self.layers = create(jax.random.split(rngs.params(), depth))
        else:
            self.layers = nnx.List([make_block(rngs) for _ in range(depth)])

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_all: bool = False,
    ):
        """Returns (x, [output of each block] if return_all else [])."""
        if self.depth == 0:
            return x, []
        use_drop = (not deterministic) and self.drop_path_rate > 0.0
        if use_drop and rngs is None:
            raise ValueError("drop_path_rate > 0 with deterministic=False needs rngs (a 'dropout' stream)")
        keys = jax.random.split(rngs.dropout(), self.depth) if use_drop else None

        def call(block, h, rate, key):
            return block(h, rate, key)

        call = maybe_remat(call, self.remat)

        if self.scan:
            rates = jnp.asarray(self.drop_rates, jnp.float32)

            def body(h, block, rate, key):
                h = call(block, h, rate, key)
                return h, (h if return_all else None)

            if use_drop:
                f = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
                x, ys = f(x, self.layers, rates, keys)
            else:
                f = nnx.scan(
                    lambda h, block, rate: body(h, block, rate, None),
                    in_axes=(nnx.Carry, 0, 0),
                    out_axes=(nnx.Carry, 0),
                )
                x, ys = f(x, self.layers, rates)
            return x, ([ys[i] for i in range(self.depth)] if return_all else [])

        outs = []
        for i, block in enumerate(self.layers):
            x = call(block, x, self.drop_rates[i], keys[i] if use_drop else None)
            outs.append(x)
        return x, (outs if return_all else [])

"""Small building blocks shared by every model: annotated Dense/Conv/LayerNorm and PyTorch-exact ops.

Everything is NHWC. Parameters are created in float32 and annotated with logical axis names
(`unitok_jax.parallel.logical_axes`); `dtype` is the compute dtype (bf16 on accelerators if configured).
These helpers exist so that PyTorch-parity details (symmetric padding on stride-2 convs, eps values,
exact vs tanh GELU, nearest up-sampling, average pooling that excludes padding) live in one place.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.parallel import logical_axes as ax

Dtype = jnp.dtype

# timm's default Linear init (trunc-normal std 0.02, zero bias).
trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def partitioned(init, axes: Sequence[str | None]):
    """Attach logical axis names to an initializer (read back by `parallel.sharding`)."""
    return nnx.with_partitioning(init, tuple(axes))


def dense(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    axes: tuple[str | None, str | None] = (ax.EMBED, ax.MLP),
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    precision: jax.lax.Precision | None = None,
    kernel_init=trunc_normal_02,
    bias_init=zeros,
) -> nnx.Linear:
    """nnx.Linear with logical axes. Kernel is (in, out) = transpose of torch's (out, in)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=precision,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(bias_init, (axes[1],)),
        rngs=rngs,
    )


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init=nnx.initializers.lecun_normal(),
    bias_init=zeros,
) -> nnx.Conv:
    """A torch-style Conv2d: symmetric zero padding `padding` (default k // 2) on both sides.

    Flax 'SAME' pads (0, 1) for stride 2 on even inputs, which differs from PyTorch; explicit pairs avoid that.
    Kernel layout (kh, kw, in/groups, out); depthwise = `groups=in_channels`.
    """
    pad = kernel_size // 2 if padding is None else padding
    kernel_axes = (None, None, None, ax.CONV_OUT) if groups > 1 else (None, None, ax.CONV_IN, ax.CONV_OUT)
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(kernel_init, kernel_axes),
        bias_init=partitioned(bias_init, (ax.CONV_OUT,)),
        rngs=rngs,
    )


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm over the last axis with affine weight/bias (works per-pixel on NHWC maps = timm LayerNorm2d)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(ones, (ax.NORM,)),
        bias_init=partitioned(zeros, (ax.NORM,)),
        rngs=rngs,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximated GELU (PyTorch approximate='tanh'); UniTok uses it only inside GeGLU."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def nearest_upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 on NHWC: every pixel repeated 2x2 (torch Upsample(scale_factor=2, mode='nearest'))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_3x3_exclude_pad(x: jax.Array, stride: int) -> jax.Array:
    """AvgPool2d(3, stride, pad 1, count_include_pad=False) on NHWC: divide by the number of valid pixels."""
    window, strides, pad = (1, 3, 3, 1), (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones_map = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    counts = jax.lax.reduce_window(ones_map, 0.0, jax.lax.add, window, strides, pad)
    return sums / counts


def avg_pool_3x3_s2_exclude_pad(x: jax.Array) -> jax.Array:
    """ViTamin's Downsample2d shortcut: corner windows divide by 4, edges by 6."""
    return avg_pool_3x3_exclude_pad(x, 2)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) (torch F.normalize), always in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def drop_path(x: jax.Array, rate: float, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per example with probability `rate`.

    `rate` may be a traced scalar (per-layer rates inside a scanned block stack); then the mask is always drawn.
    """
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # Cast back: a traced float32 `rate` would otherwise promote bf16 activations (and break scan carries).
    return jnp.where(mask, (x / keep).astype(x.dtype), jnp.zeros_like(x))

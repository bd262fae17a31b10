"""The FID InceptionV3: TF-2015 `inception-2015-12-05` graph as ported to PyTorch by pytorch-fid / torch-fidelity.

Loads the weight file `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid; torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` has the same keys and values) and returns, per image,
  * 'pool3'            [b, 2048]  global average pool after Mixed_7c: the FID / KID feature,
  * 'logits_unbiased'  [b, 1008]  pool3 @ fc.weight.T without the bias: torch-fidelity's default IS feature,
                                  which reproduces OpenAI's original TF Inception-Score code (matmul with the
                                  softmax weights, no bias);
  * 'logits'           [b, 1008]  with the bias.
The graph has 1008 outputs (1000 ImageNet classes + 8 unused); IS takes the softmax over all 1008
(torch-fidelity `isc_features_to_metric`, OpenAI `inception_score.py`), not over the first 1000.

Differences from torchvision's InceptionV3, all reproduced (pytorch-fid `FIDInception*`, torch-fidelity):
  * BatchNorm eps 1e-3, inference statistics only;
  * the 3x3 average-pool branches of Mixed_5b-d (A), Mixed_6b-e (C) and Mixed_7b (E_1) exclude the zero
    padding from the divisor (TF `avg_pool` semantics, `count_include_pad=False`);
  * Mixed_7c (E_2) uses a 3x3 *max* pool in its pool branch;
  * fc has 1008 outputs; no aux classifier.

Pre-processing (images NHWC in [0, 1]), selected by `resize_mode`:
  * 'pytorch_fid' (default): `F.interpolate(x, (299, 299), mode='bilinear', align_corners=False)` (half-pixel
    centres, no antialias) on the float images, then 2x - 1. This is pytorch-fid, used by TokenFlow.
  * 'torch_fidelity': quantise to uint8 (round(255 x)), TF-1.x bilinear resize (src = dst * in/out, no
    half-pixel offset), then (x - 128) / 128. This is torch-fidelity's `inception-v3-compat`, used by UniTok
    (which also saved reconstructions as PNG, i.e. uint8, first).
For 299x299 inputs both resizes are the identity. Resizing is done with two small interpolation matrices
(exact, jit-friendly, no `jax.image.resize` semantics questions).
Not here: the Frechet distance and IS maths (evals/fid.py).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax import paths

import unitok_jax  # noqa: F401  (flax config)
from unitok_jax.models import layers as L
from unitok_jax.models.layers import partitioned, zeros, ones
from unitok_jax.parallel import logical_axes as ax

INPUT_SIZE = 299
NUM_LOGITS = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3
RESIZE_MODES = ("pytorch_fid", "torch_fidelity")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """[out_size, in_size] float32 interpolation matrix for one spatial axis.

    'pytorch_fid': torch upsample_bilinear2d, align_corners=False: src = (dst + .5) * in/out - .5, clamped at 0.
    'torch_fidelity': TF 1.x resize_bilinear, align_corners=False: src = dst * in/out.
    Both: lo = floor(src), hi = min(lo + 1, in - 1), weights (1 - frac, frac); coordinates in float32 as the
    reference kernels compute them (so floors land on the same side).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {mode!r}; available: {list(RESIZE_MODES)}")
    dst = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size / out_size)
    if mode == "pytorch_fid":
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    else:
        src = dst * scale
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE, mode: str = "pytorch_fid") -> jax.Array:
    """NHWC bilinear resize to size x size with the given reference semantics (identity if already that size)."""
    _, h, w, _ = x.shape
    if (h, w) == (size, size):
        return x
    rh = jnp.asarray(bilinear_matrix(h, size, mode))
    rw = jnp.asarray(bilinear_matrix(w, size, mode))
    x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rw, x, precision=_HIGHEST)


def preprocess(x: jax.Array, mode: str = "pytorch_fid", *, resize: bool = True) -> jax.Array:
    """Images in [0, 1] (NHWC, float or uint8) -> network input in [-1, 1] at 299x299 (see module doc)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {mode!r}; available: {list(RESIZE_MODES)}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
    is_uint8 = jnp.asarray(x).dtype == jnp.uint8
    x = jnp.asarray(x, jnp.float32)
    if mode == "pytorch_fid":
        if is_uint8:
            x = x / 255.0
        if resize:
            x = resize_bilinear(x, INPUT_SIZE, mode)
        return 2.0 * x - 1.0
    x255 = x if is_uint8 else jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
    if resize:
        x255 = resize_bilinear(x255, INPUT_SIZE, mode)
    return (x255 - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------- pooling


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """MaxPool2d(3, stride 2), no padding."""
    return _max_pool(x, 2, 0)


def max_pool_3x3_s1_same(x: jax.Array) -> jax.Array:
    """max_pool2d(3, stride 1, pad 1): padded positions never win (implicit -inf)."""
    return _max_pool(x, 1, 1)


def avg_pool_3x3_s1_exclude_pad(x: jax.Array) -> jax.Array:
    """avg_pool2d(3, stride 1, pad 1, count_include_pad=False): border windows divide by the valid count."""
    return L.avg_pool_3x3_exclude_pad(x, 1)


# ----------------------------------------------------------------------------------------------- modules


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; torch keys `.conv.weight`, `.bn.*`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: jax.lax.Precision | None = _HIGHEST,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(kh, kw),
            strides=(stride, stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=precision,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, ax.CONV_IN, ax.CONV_OUT)),
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_channels,
            use_running_average=True,
            epsilon=BN_EPS,
            param_dtype=jnp.float32,
            scale_init=partitioned(ones, (ax.NORM,)),
            bias_init=partitioned(zeros, (ax.NORM,)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
    """Mixed_5b/c/d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(excl. pad)->1x1."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs, precision=_HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch1x1 = c(in_channels, 64, 1)
        self.branch5x5_1 = c(in_channels, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(in_channels, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(in_channels, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_s1_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, precision=_HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch3x3 = c(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(in_channels, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b-e: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool(excl. pad)->1x1."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs, precision=_HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        c7 = channels_7x7
        self.branch1x1 = c(in_channels, 192, 1)
        self.branch7x7_1 = c(in_channels, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(in_channels, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(in_channels, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_3x3_s1_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, precision=_HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch3x3_1 = c(in_channels, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(in_channels, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (pool='avg', excl. pad) / Mixed_7c (pool='max', the TF graph's quirk).

    1x1 | 1x1->[1x3, 3x1] | 1x1->3x3->[1x3, 3x1] | pool->1x1.
    """

    def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs, precision=_HIGHEST):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch1x1 = c(in_channels, 320, 1)
        self.branch3x3_1 = c(in_channels, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(in_channels, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(in_channels, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_3x3_s1_exclude_pad(x) if self.pool == "avg" else max_pool_3x3_s1_same(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FidInceptionV3(nnx.Module):
    """The FID InceptionV3 (see module doc). Call on NHWC images in [0, 1]; returns a dict of features.

    `resize_input=False` skips the resize to 299 (inputs must then be >= 75x75; used by fast tests).
    Attribute names equal the PyTorch module names, so state-dict keys map 1:1 (see `torch_key_map`).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        resize_mode: str = "pytorch_fid",
        resize_input: bool = True,
        precision: jax.lax.Precision | None = _HIGHEST,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; available: {list(RESIZE_MODES)}")
        self.resize_mode = resize_mode
        self.resize_input = resize_input
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        kw = dict(rngs=rngs, precision=precision)
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", **kw)
        self.fc = nnx.Linear(
            FEATURE_DIM,
            NUM_LOGITS,
            precision=precision,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (ax.EMBED, ax.VOCAB)),
            bias_init=partitioned(zeros, (ax.VOCAB,)),
            rngs=rngs,
        )

    def features(self, x: jax.Array) -> jax.Array:
        """Network input in [-1, 1] (already resized) -> pool3 features [b, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147x64
        x = max_pool_3x3_s2(x)  # 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71x192
        x = max_pool_3x3_s2(x)  # 35
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)  # 35x35x288 -> 17x17x768 -> 8x8x2048
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(images, self.resize_mode, resize=self.resize_input)
        pool3 = self.features(x)
        logits_unbiased = jnp.dot(pool3, self.fc.kernel[...], precision=_HIGHEST)
        return {"pool3": pool3, "logits_unbiased": logits_unbiased, "logits": logits_unbiased + self.fc.bias[...]}


# ----------------------------------------------------------------------------------------------- weights

_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BN step counters: no effect at inference


def _abstract_model(**kwargs) -> FidInceptionV3:
    return nnx.eval_shape(lambda: FidInceptionV3(rngs=nnx.Rngs(0), **kwargs))


@functools.lru_cache(maxsize=1)
def _default_key_map():
    return _key_map_of(_abstract_model())


def torch_key_map(model: FidInceptionV3 | None = None) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """{torch key: (nnx path, torch shape, layout)} for every weight of the model, generated from the module.

    layout: 'conv' (torch OIHW <-> nnx HWIO), 'linear' (torch (out, in) <-> nnx (in, out)), 'vector'.
    """
    return dict(_default_key_map()) if model is None else _key_map_of(model)


def _key_map_of(model: FidInceptionV3):
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        path = tuple(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        module, leaf = path[:-1], path[-1]
        if leaf == "kernel" and len(shape) == 4:
            kh, kw, i, o = shape
            key, torch_shape, layout = ".".join(module + ("weight",)), (o, i, kh, kw), "conv"
        elif leaf == "kernel":
            key, torch_shape, layout = ".".join(module + ("weight",)), shape[::-1], "linear"
        else:
            torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
            key, torch_shape, layout = ".".join(module + (torch_leaf,)), shape, "vector"
        out[key] = (path, torch_shape, layout)
    return out


def state_dict_shapes(*, include_num_batches_tracked: bool = False) -> dict[str, tuple[int, ...]]:
    """The expected pytorch-fid state-dict key -> shape table (generated from the module)."""
    table = {k: v[1] for k, v in torch_key_map().items()}
    if include_num_batches_tracked:
        for k in list(table):
            if k.endswith(".bn.running_var"):
                table[k[: -len("running_var")] + "num_batches_tracked"] = ()
    return table


def _to_nnx(value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if layout == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if layout == "linear":
        return value.T
    return value


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if layout == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if layout == "linear":
        return value.T
    return value


def _check_keys(sd: Mapping[str, np.ndarray], key_map) -> None:
    missing = [k for k in key_map if k not in sd]
    unexpected = [k for k in sd if k not in key_map and not k.endswith(_IGNORED_SUFFIXES)]
    bad_shape = [
        f"{k}: file {tuple(np.shape(sd[k]))} vs expected {key_map[k][1]}"
        for k in key_map
        if k in sd and tuple(np.shape(sd[k])) != key_map[k][1]
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise ValueError(
            "not a pytorch-fid InceptionV3 state dict (pt_inception-2015-12-05-6726825d.pth): " + "; ".join(problems)
        )


def load_fid_inception(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    resize_mode: str = "pytorch_fid",
    resize_input: bool = True,
    precision: jax.lax.Precision | None = _HIGHEST,
) -> FidInceptionV3:
    """Build the FID InceptionV3 from a pytorch-fid / torch-fidelity weight file or a {key: array} dict.

    Every key is consumed: missing, unexpected (other than BN `num_batches_tracked`) or mis-shaped entries raise
    a ValueError naming them. Reading a .pth file needs torch (optional extra); a dict of numpy arrays or an
    .npz written once with `np.savez(path, **export_state_dict(model))` does not.
    """
    from unitok_jax.torch_io import load_state_dict

    if isinstance(path_or_state_dict, (str, os.PathLike)) and os.fspath(path_or_state_dict).endswith(".npz"):
        if not paths.exists(path_or_state_dict):
            raise FileNotFoundError(f"InceptionV3 weights not found: {os.fspath(path_or_state_dict)}")
        with np.load(paths.local_copy(path_or_state_dict), allow_pickle=False) as data:
            path_or_state_dict = {k: data[k] for k in data.files}
    sd = load_state_dict(path_or_state_dict, subkeys=("state_dict",))
    _check_keys(sd, torch_key_map())  # fail fast, before building the model
    abstract = _abstract_model(resize_mode=resize_mode, resize_input=resize_input, precision=precision)
    key_map = torch_key_map(abstract)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    by_path = {tuple(str(q) for q in p): var for p, var in flat}
    for key, (path, _, layout) in key_map.items():
        by_path[path].set_value(jnp.asarray(_to_nnx(sd[key], layout)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_state_dict(model: FidInceptionV3, *, include_num_batches_tracked: bool = False) -> dict[str, np.ndarray]:
    """Inverse of `load_fid_inception`: model weights as a pytorch-fid-layout {key: float32 array} dict."""
    out = {}
    for key, (path, _, layout) in torch_key_map(model).items():
        node = model
        for p in path:
            node = getattr(node, p)
        out[key] = _to_torch(np.asarray(node.get_value()), layout)
        if include_num_batches_tracked and key.endswith(".bn.running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def random_state_dict(seed: int = 0, *, include_num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """A synthetic pytorch-fid-layout state dict with plausible random values (tests, benchmarks, no weights).

    Conv weights He-scaled, BN running_var in [0.5, 1.5] and small means, so activations stay O(1) through
    the 94 conv layers.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in state_dict_shapes(include_num_batches_tracked=include_num_batches_tracked).items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(1000, np.int64)
        elif key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif key == "fc.weight":
            out[key] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith(".bn.weight"):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:  # bn.bias, running_mean, fc.bias
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out

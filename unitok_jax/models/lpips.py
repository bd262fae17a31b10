"""LPIPS perceptual distance (VGG-16 variant used by UniTok) in Flax NNX; it does not train or download weights.

Mirrors UniTok's `utils/lpips.py` (fixtures README §4), NHWC throughout:

  x in [-1, 1]  ->  (x - shift) * scale_inv
                ->  VGG-16 `features` cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                    (3x3 convs with symmetric pad 1, ReLU, 2x2/2 max-pool)
                ->  per tap: f / (sqrt(sum_c f^2 + 1e-9) + 1e-10) for both images, squared difference,
                    1x1 conv C -> 1 without bias (the "lin" head)
                ->  spatial mean per example, summed over the 5 taps.

The official module returns the mean over the batch (`lpips_loss`); `LPIPS.__call__` returns the per-example
distances [b] so evals can use the same forward.

The network is frozen: the trainer keeps it out of the optimizer (it is an ordinary `nnx.Module` whose weights
are `nnx.Param`s; pass the model to `jax.lax.stop_gradient`-free code, its params simply never get updated).
All arithmetic runs in float32 with `precision=HIGHEST` so accelerators do not fall back to TF32/bf16 matmuls.

Weights: `load_lpips(path_or_state_dict)` reads UniTok's `lpips_with_vgg.pth` (keys `net.slice{1..5}.{i}.weight/bias`,
`lins.{0..4}.model.1.weight`; optional buffers `shift`, `scale_inv` or `scale`), a {key: array} dict, or an `.npz`
(a `param/` prefix, as in the parity fixture, is stripped). Every key must be consumed; missing, unexpected and
wrongly shaped keys raise a `ValueError` listing them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax import paths

from unitok_jax.models import layers
from unitok_jax.parallel import logical_axes as ax

# (shift, scale) of the LPIPS ScalingLayer; inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# VGG-16 convs per slice: (torch index inside the slice, in_channels, out_channels). Slices 2..5 start with the
# max-pool (index 0), so their convs sit at the odd indices 1, 3, 5 (ReLUs at the even ones).
VGG16_SLICES: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((0, 3, 64), (2, 64, 64)),
    ((1, 64, 128), (3, 128, 128)),
    ((1, 128, 256), (3, 256, 256), (5, 256, 256)),
    ((1, 256, 512), (3, 512, 512), (5, 512, 512)),
    ((1, 512, 512), (3, 512, 512), (5, 512, 512)),
)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_HIGHEST = jax.lax.Precision.HIGHEST


class LpipsBuffer(nnx.Variable):
    """Constant buffers of the scaling layer (shift, scale_inv): loaded, never optimised."""


def _conv(in_ch: int, out_ch: int, k: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    pad = k // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(k, k),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=_HIGHEST,
        kernel_init=layers.partitioned(nnx.initializers.lecun_normal(), (None, None, ax.CONV_IN, ax.CONV_OUT)),
        bias_init=layers.partitioned(layers.zeros, (ax.CONV_OUT,)),
        rngs=rngs,
    )


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def normalize_channels(x: jax.Array, eps_inner: float = 1e-9, eps_outer: float = 1e-10) -> jax.Array:
    """x / (sqrt(sum_c x^2 + 1e-9) + 1e-10) over the last (channel) axis, as UniTok's `normalize_tensor`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps_inner)
    return x / (norm + eps_outer)


class VGG16Slice(nnx.Module):
    """One LPIPS slice: [max-pool] then (conv3x3 + ReLU) * n."""

    def __init__(self, index: int, convs: tuple[tuple[int, int, int], ...], *, rngs: nnx.Rngs):
        self.pool_first = index > 0
        self.torch_indices = tuple(c[0] for c in convs)
        self.convs = nnx.List([_conv(cin, cout, 3, use_bias=True, rngs=rngs) for _, cin, cout in convs])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool_first:
            x = _max_pool_2x2(x)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return x


class LPIPS(nnx.Module):
    """VGG-16 LPIPS. `__call__(x0, x1)` -> per-example distances [b]; inputs NHWC in [-1, 1]."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.shift = LpipsBuffer(jnp.asarray(LPIPS_SHIFT, jnp.float32))
        self.scale_inv = LpipsBuffer(jnp.float32(1.0) / jnp.asarray(LPIPS_SCALE, jnp.float32))
        self.slices = nnx.List([VGG16Slice(i, convs, rngs=rngs) for i, convs in enumerate(VGG16_SLICES)])
        self.lins = nnx.List([_conv(c, 1, 1, use_bias=False, rngs=rngs) for c in LPIPS_CHANNELS])

    def scale_input(self, x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) - self.shift[...]) * self.scale_inv[...]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The 5 raw tap activations (relu1_2 ... relu5_3) of already-scaled NHWC input."""
        feats = []
        for s in self.slices:
            x = s(x)
            feats.append(x)
        return feats

    def layer_outputs(self, x0: jax.Array, x1: jax.Array) -> dict[str, Any]:
        """Everything the parity test compares.

        Returns a dict with `scaled_input` [2b,h,w,3] (x0 then x1), `features` (5 taps of the concatenated batch),
        `maps` (5 x [b,h_i,w_i,1] head outputs), `per_sample` (5 x [b]) spatial means, `dists` (5 scalars, means over
        batch) and `per_example` [b] (sum over taps) and `value` (scalar, the official LPIPS output).
        """
        b = x0.shape[0]
        scaled = self.scale_input(jnp.concatenate([x0, x1], axis=0))
        feats = self.features(scaled)
        maps, per_sample = [], []
        for f, lin in zip(feats, self.lins):
            d = jnp.square(normalize_channels(f[:b]) - normalize_channels(f[b:]))
            m = lin(d)
            maps.append(m)
            per_sample.append(jnp.mean(m, axis=(1, 2, 3)))
        dists = [jnp.mean(p) for p in per_sample]
        per_example = sum(per_sample[1:], per_sample[0])
        return {
            "scaled_input": scaled,
            "features": feats,
            "maps": maps,
            "per_sample": per_sample,
            "dists": dists,
            "per_example": per_example,
            "value": sum(dists[1:], dists[0]),
        }

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        return self.layer_outputs(x0, x1)["per_example"]


def lpips_loss(model: LPIPS, x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Scalar LPIPS = mean over the batch of the per-example distance (= UniTok's LPIPS.forward value)."""
    return jnp.mean(model(x0, x1))


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def _read_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
    if isinstance(path_or_state_dict, (str, os.PathLike)) and os.fspath(path_or_state_dict).endswith(".npz"):
        path = os.fspath(path_or_state_dict)
        if not paths.exists(path):
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
        with np.load(paths.local_copy(path)) as z:
            sd = {k: np.asarray(z[k]) for k in z.files}
    else:
        from unitok_jax import torch_io

        sd = torch_io.load_state_dict(path_or_state_dict, subkeys=("state_dict", "model"))
    # The parity fixture stores the state dict under `param/`; inputs/outputs of other prefixes are ignored only
    # when that prefix is present (then the `param/` entries are the state dict).
    if any(k.startswith("param/") for k in sd):
        sd = {k[len("param/") :]: v for k, v in sd.items() if k.startswith("param/")}
    return sd


def expected_lpips_keys() -> dict[str, tuple[int, ...]]:
    """Required checkpoint keys of `lpips_with_vgg.pth` and their PyTorch shapes."""
    keys: dict[str, tuple[int, ...]] = {}
    for s, convs in enumerate(VGG16_SLICES):
        for idx, cin, cout in convs:
            keys[f"net.slice{s + 1}.{idx}.weight"] = (cout, cin, 3, 3)
            keys[f"net.slice{s + 1}.{idx}.bias"] = (cout,)
    for i, c in enumerate(LPIPS_CHANNELS):
        keys[f"lins.{i}.model.1.weight"] = (1, c, 1, 1)
    return keys


_OPTIONAL_BUFFERS = {"shift": (1, 3, 1, 1), "scale_inv": (1, 3, 1, 1), "scale": (1, 3, 1, 1)}


def load_lpips(path_or_state_dict, *, model: LPIPS | None = None) -> LPIPS:
    """Build (or fill `model`) from UniTok's LPIPS state dict; strict: every key consumed, every weight set."""
    sd = _read_state_dict(path_or_state_dict)
    required = expected_lpips_keys()
    missing = sorted(set(required) - set(sd))
    unexpected = sorted(set(sd) - set(required) - set(_OPTIONAL_BUFFERS))
    wrong = []
    for k, v in sd.items():
        want = required.get(k) or _OPTIONAL_BUFFERS.get(k)
        if want is not None and tuple(np.shape(v)) != want and not (k in _OPTIONAL_BUFFERS and np.size(v) == 3):
            wrong.append(f"{k}: got {tuple(np.shape(v))}, expected {want}")
    if "scale" in sd and "scale_inv" in sd:
        unexpected.append("scale (given together with scale_inv)")
    if missing or unexpected or wrong:
        raise ValueError(
            "LPIPS state dict does not match the VGG-16 LPIPS layout:"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  wrong shapes: {wrong}" if wrong else "")
        )
    # Without a given model, build it abstractly: every weight is overwritten, so skip the random init of 14.7 M
    # parameters (set_value works on abstract and concrete Variables alike).
    model = model if model is not None else nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0)))
    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    for s, (slc, convs) in enumerate(zip(model.slices, VGG16_SLICES)):
        for conv, (idx, _, _) in zip(slc.convs, convs):
            w = np.asarray(sd[f"net.slice{s + 1}.{idx}.weight"], np.float32)
            conv.kernel.set_value(f32(w.transpose(2, 3, 1, 0)))  # (O,I,kh,kw) -> (kh,kw,I,O)
            conv.bias.set_value(f32(sd[f"net.slice{s + 1}.{idx}.bias"]))
    for i, lin in enumerate(model.lins):
        lin.kernel.set_value(f32(np.asarray(sd[f"lins.{i}.model.1.weight"], np.float32).transpose(2, 3, 1, 0)))
    shift = np.reshape(sd["shift"], (3,)) if "shift" in sd else np.asarray(LPIPS_SHIFT, np.float32)
    if "scale_inv" in sd:
        scale_inv = np.reshape(sd["scale_inv"], (3,))
    else:
        scale = np.reshape(sd["scale"], (3,)) if "scale" in sd else np.asarray(LPIPS_SCALE, np.float32)
        scale_inv = np.float32(1.0) / np.asarray(scale, np.float32)
    model.shift.set_value(f32(shift))
    model.scale_inv.set_value(f32(scale_inv))
    return model

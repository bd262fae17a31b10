"""Analytic model FLOPs of a train step, peak FLOP/s per chip, and the `perf/mfu` metrics.

Per-model forward counts: `flops_unitok.py`, `flops_tokenflow.py` (building blocks: `flops_common.py`).

What is counted: matmul and convolution FLOPs (2 per multiply-add) plus the attention score/value products;
elementwise work (norms, activations, softmax, the optimizer) and rematerialisation are not counted, as is usual for
MFU ("model FLOPs", not "hardware FLOPs"). Each forward count is multiplied by how it is used in the step:

  x3  trained and on the gradient path (forward + input gradient + weight gradient): encoder, projections,
      decoder, CLIP head, text tower, contrastive logits, the discriminator heads/convs in its own update;
  x2  frozen but on the gradient path (forward + input gradient only): LPIPS on the reconstruction, the
      discriminator (DINOv2 backbone and heads) in the generator's GAN loss;
  x1  forward only: LPIPS on the target image, the code assignment (stop-gradient), the frozen DINOv2 backbone in
      the discriminator update (its inputs need no gradient).

The adaptive GAN weight needs d(L_nll)/d(rec) and d(L_gan)/d(rec), which the main backward pass already computes
(an optimal implementation shares them; XLA CSEs the repeated forwards), so it adds nothing here; XLA's own count
of the GAN step is therefore somewhat higher than this one.

Validated (tests/test_flops.py) against the official model's FlopCounterMode numbers (ViTamin-L encoder
189, decoder 504, text tower 13 GFLOP per image; FlopCounterMode did not count the attention products there,
hence `include_attention=False` to compare) and against XLA's `cost_analysis()` of the compiled tiny step.

    flops = step_flops(config, gan_active=False)           # StepFlops(total=..., terms=[...])
    peak = peak_flops_per_device(jax.devices()[0])         # None on CPU / unknown chips
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

from unitok_jax.train.flops_common import Term, config_value, conv, vit_block
from unitok_jax.train.flops_tokenflow import tokenflow_step_terms
from unitok_jax.train.flops_unitok import unitok_step_terms

# Dense bf16 peak FLOP/s per chip (no sparsity), from the vendors' data sheets. Matched against
# `device.device_kind` (lower-cased substrings, first match wins); CPUs and unknown chips have no peak (MFU = NaN).
PEAK_FLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("TPU v6e", ("v6 lite", "v6e"), 918e12),
    ("TPU v5e", ("v5 lite", "v5e", "v5litepod"), 197e12),
    ("TPU v5p", ("v5p", "tpu v5"), 459e12),
    ("TPU v4", ("tpu v4",), 275e12),
    ("H200", ("h200",), 989e12),
    ("H100 PCIe", ("h100 pcie",), 756e12),
    ("H100", ("h100",), 989e12),
    ("A100", ("a100",), 312e12),
)


def peak_flops_per_device(device_or_kind: Any) -> float | None:
    """Peak dense bf16 FLOP/s of one device (a jax.Device or its `device_kind` string); None if unknown / CPU."""
    kind = getattr(device_or_kind, "device_kind", device_or_kind)
    platform = getattr(device_or_kind, "platform", "")
    if platform == "cpu" or not isinstance(kind, str):
        return None
    kind = kind.lower()
    for _, needles, peak in PEAK_FLOPS:
        if any(n in kind for n in needles):
            return peak
    return None


def lpips_flops(image_size: int) -> float:
    """VGG-16 trunk up to relu5_3 + the 1x1 heads, for one image."""
    from unitok_jax.models.lpips import LPIPS_CHANNELS, VGG16_SLICES

    f, r = 0.0, image_size
    for s, convs in enumerate(VGG16_SLICES):
        if s > 0:
            r //= 2
        for _, cin, cout in convs:
            f += conv(r, r, 3, cin, cout)
    r = image_size
    for s, c in enumerate(LPIPS_CHANNELS):
        f += conv(r, r, 1, c, 1)
        r //= 2
    return f


def discriminator_flops(disc_cfg, image_size: int) -> dict[str, float]:
    """{'backbone': frozen part, 'heads': trainable part} forward FLOPs for one image."""
    name = config_value(disc_cfg, "name", "patch")
    if name == "dino":
        p = int(config_value(disc_cfg, "patch_size", 14))
        d = int(config_value(disc_cfg, "width", 384))
        depth = int(config_value(disc_cfg, "dino_depth", 12))
        taps = config_value(disc_cfg, "taps", None) or tuple(t for t in (0, 2, 5, 8, 11) if t < depth)
        k = int(config_value(disc_cfg, "kernel_size", 9))
        g = image_size // p
        n = g * g
        backbone = conv(g, g, p, 3, d) + (max(taps) + 1) * vit_block(n + 1, d, 4 * d, geglu=False)
        head = 2.0 * n * d * d + 2.0 * n * k * d * d + 2.0 * n * d
        return {"backbone": backbone, "heads": len(taps) * head}
    if name == "patch":
        width = int(config_value(disc_cfg, "width", 64))
        layers = int(config_value(disc_cfg, "num_layers", 3))
        chans = [min(width * 2**i, width * 8) for i in range(layers + 1)]
        r = image_size // 2
        f = conv(r, r, 4, 3, chans[0])
        for i in range(1, layers):
            r //= 2
            f += conv(r, r, 4, chans[i - 1], chans[i])
        r -= 1
        f += conv(r, r, 4, chans[layers - 1], chans[layers])
        r -= 1
        f += conv(r, r, 4, chans[layers], 1)
        return {"backbone": 0.0, "heads": f}
    raise ValueError(f"unknown discriminator {name!r} for FLOP counting")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    terms: tuple[Term, ...]

    @property
    def total(self) -> float:
        return sum(t.total for t in self.terms)

    def as_dict(self) -> dict[str, float]:
        return {t.name: t.total for t in self.terms}


# model_name -> the generator's terms of one step; a new tokenizer registers its counter here.
STEP_TERMS: dict[str, Callable[..., list[Term]]] = {"unitok": unitok_step_terms, "tokenflow": tokenflow_step_terms}


def step_flops(config, *, gan_active: bool, include_attention: bool = True) -> StepFlops:
    """Model FLOPs of one train step for the whole global batch (divide by devices for per-device)."""
    b = int(config.global_batch_size)
    s = int(config.data.image_size)
    model_name = config_value(config, "model_name", "unitok")
    if model_name not in STEP_TERMS:
        raise ValueError(f"no FLOP counter for model {model_name!r} (known: {sorted(STEP_TERMS)})")
    terms = STEP_TERMS[model_name](config, b, s, include_attention=include_attention)
    if config.loss.lpips:
        lp = b * lpips_flops(s)
        terms += [Term("lpips_reconstruction", lp, 2), Term("lpips_target", lp, 1)]
    gan = bool(config.loss.gan) and config_value(config.discriminator, "name", "none") != "none"
    if gan and gan_active:
        d = discriminator_flops(config.discriminator, s)
        dino = config_value(config.discriminator, "name") == "dino"
        # G step: D(fake) forward + input gradient (D frozen there).
        terms.append(Term("disc_in_generator", b * (d["backbone"] + d["heads"]), 2))
        # D step: D on real and fake (+ bCR: two more views each); heads trained, DINO backbone forward only.
        views = 4 if config.loss.bcr else 2
        if dino:
            terms.append(Term("disc_backbone_in_disc_step", views * b * d["backbone"], 1))
            terms.append(Term("disc_heads_in_disc_step", views * b * d["heads"], 3))
        else:
            terms.append(Term("disc_in_disc_step", views * b * d["heads"], 3))
    return StepFlops(tuple(terms))


# ----------------------------------------------------------------------------------------------------------------
# XLA's view, for validation: matmul/conv FLOPs of a compiled (optimised) HLO module.

_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_HLO_OP = re.compile(r"\b(convolution|dot)\(([^)]*)\)")


def hlo_matmul_flops(hlo_text: str) -> dict[str, float]:
    """Sum 2·MACs of every `dot` and `convolution` in HLO text (e.g. `compiled.as_text()`), split by the JAX
    transform that produced it: 'forward' (jvp), 'backward' (transpose of jvp), 'other' (no metadata: usually
    weight gradients that XLA rewrote, or forward-only code). While-loop bodies are counted once."""
    shapes: dict[str, tuple[int, ...]] = {}
    lines = hlo_text.splitlines()
    for line in lines:
        m = _HLO_DEF.match(line)
        if m:
            shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d)
    out = {"forward": 0.0, "backward": 0.0, "other": 0.0}
    for line in lines:
        m, op = _HLO_DEF.match(line), _HLO_OP.search(line)
        if not m or not op:
            continue
        operands = [a.strip().lstrip("%") for a in op.group(2).split(",")]
        result = math.prod(shapes[m.group(1)])
        if op.group(1) == "dot":
            lhs = shapes[operands[0]]
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            k = math.prod(lhs[int(i)] for i in dims.group(1).split(",") if i) if dims else 1
            flops = 2.0 * result * k
        else:
            rhs = shapes[operands[1]]
            kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
            window = re.search(r"window=\{size=([\dx]+)", line)
            window_size = math.prod(int(x) for x in window.group(1).split("x")) if window else 1
            flops = 2.0 * result * window_size * rhs[kernel_labels.index("i")]
        name = re.search(r'op_name="([^"]*)"', line)
        name = name.group(1) if name else ""
        out["backward" if "transpose(" in name else "forward" if "jvp(" in name else "other"] += flops
    return out


# ----------------------------------------------------------------------------------------------------------------
# Trainer hook.


class FlopsMeter:
    """Turns measured steps/s into `perf/tflops_per_device` and `perf/mfu` (left out when the peak is unknown)."""

    def __init__(self, config, devices):
        devices = list(devices)
        self.num_devices = len(devices)
        self.peak = peak_flops_per_device(devices[0]) if devices else None
        self._per_step = {}
        for gan_active in (False, True):
            try:
                self._per_step[gan_active] = step_flops(config, gan_active=gan_active).total
            except Exception:  # a model this module does not know: report NaN rather than fail training
                self._per_step[gan_active] = math.nan

    def flops_per_step(self, gan_active: bool) -> float:
        return self._per_step[bool(gan_active)]

    def metrics(self, steps_per_sec: float, gan_active: bool) -> dict[str, float]:
        """`perf/tflops_per_device`, plus `perf/mfu` when the chip's peak is known (not on CPU: no NaN in logs)."""
        achieved = self.flops_per_step(gan_active) * steps_per_sec / max(self.num_devices, 1)
        if not math.isfinite(achieved):
            return {}
        out = {"perf/tflops_per_device": achieved / 1e12}
        if self.peak:
            out["perf/mfu"] = achieved / self.peak
        return out

"""Ahead-of-time memory estimate of a config's train step on a fake multi-device mesh, without allocating it.

    python benchmarks/aot_memory.py --config=configs/unitok.py:paper --num_devices=16 --per_device_batch=64 \
        --remat=full,none [--variant=gan] [--append_results]

The step is lowered with abstract arguments (`components.abstract_state` + the state shardings, an abstract frozen
tree, a ShapeDtypeStruct batch) and compiled for `--num_devices` fake CPU devices
(`--xla_force_host_platform_device_count`); `compiled.memory_analysis()` then gives the per-device argument,
output, temp (activations, gradients, collectives' buffers) and generated-code sizes. Nothing model-sized is
allocated, so the 820 M paper model fits on a laptop.

Caveats: this is the *CPU* compiler's buffer assignment. GPU/TPU compilers fuse differently (and TPU/GPU keep
bf16 matmuls in bf16 while the CPU backend may upcast them to f32 inside fusions), so treat the numbers as an
estimate; they are usually a little pessimistic for TPU. LPIPS and DINOv2 weights are not needed: their abstract
shapes are used. With `scan_blocks=True` compile time is independent of depth.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

from absl import app, flags
from ml_collections import config_flags


def _set_device_count(n: int) -> None:
    if "jax" in sys.modules:
        raise RuntimeError("set the device count before importing jax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={n}"
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f] + [flag]
    )


if __name__ == "__main__":
    # The device count must be fixed before JAX initialises, and defining --config below already loads the default
    # config file (which imports jax): read --num_devices from argv before anything else.
    _count = 16
    for _arg in sys.argv[1:]:
        if _arg.startswith("--num_devices="):
            _count = int(_arg.split("=", 1)[1])
    _set_device_count(_count)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_CONFIG = config_flags.DEFINE_config_file("config", "configs/unitok.py:paper", "config file")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 16, "fake CPU devices (set before JAX initialises)")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 64, "images per device (global batch = this x devices)")
_REMAT = flags.DEFINE_list("remat", ["full", "none"], "model.remat settings to compile, in order")
_VARIANT = flags.DEFINE_enum("variant", "gan", ["gan", "no_gan"], "which compiled step: with the GAN (G+D) or without")
_SCAN = flags.DEFINE_bool("scan_blocks", None, "override model.scan_blocks (default: the config's)")
_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", None, "micro-batches per step (per-device micro-batch = batch / this); default: the config's"
)
_ACCUM_MODE = flags.DEFINE_enum(
    "grad_accum_mode",
    "full_batch",
    ["full_batch", "micro_batch"],
    "full_batch: exact CLIP/adaptive weight (+1 forward); micro_batch: per micro-batch",
)
_APPEND = flags.DEFINE_string(
    "append_results", "", "append a markdown section to this file (e.g. benchmarks/RESULTS.md)"
)


def main(_):
    import jax

    from unitok_jax.train import aot

    config = _CONFIG.value
    n = jax.device_count()
    config.global_batch_size = _PER_DEVICE_BATCH.value * n
    if _SCAN.value is not None:
        config.model.scan_blocks = _SCAN.value
    if _ACCUM.value is not None:
        config.grad_accum_steps = _ACCUM.value
    config.grad_accum_mode = _ACCUM_MODE.value
    config.grad_accum_unroll = (
        False  # compile the accelerators' scan, not the CPU unrolling (trainer._grad_accum_unroll)
    )
    accum = int(config.get("grad_accum_steps", 1))
    rows = []
    for remat in _REMAT.value:
        config.model.remat = remat
        compiled, components, lower_s, compile_s = aot.compile_train_step(config, gan=_VARIANT.value == "gan")
        row = aot.memory_summary(compiled)
        row.update(remat=remat, lower_s=lower_s, compile_s=compile_s, flops=aot.xla_flops(compiled))
        rows.append(row)
        print(
            f"remat={remat:>13}: per device argument {row['argument']:.2f} GiB, output {row['output']:.2f}, "
            f"alias {row['alias']:.2f}, temp {row['temp']:.2f}, total {row['total']:.2f} GiB; "
            f"lower {lower_s:.0f}s compile {compile_s:.0f}s; XLA flops/device {row['flops']:.3g}",
            flush=True,
        )
        del compiled
    mesh = dict(components.mesh.shape)
    header = (
        f"{config.get('variant', '?')} config, model.scan_blocks={bool(config.model.scan_blocks)}, "
        f"dtype={config.model.dtype}, step={_VARIANT.value}, mesh={mesh} ({n} fake CPU devices), "
        f"global batch {config.global_batch_size} ({_PER_DEVICE_BATCH.value}/device"
        f"{f' as {accum} micro-batches of {_PER_DEVICE_BATCH.value // accum}, {_ACCUM_MODE.value} accumulation' if accum > 1 else ''}), "
        f"{config.model.image_size}px, {components.param_count / 1e6:.1f} M generator params"
    )
    print(header)
    if _APPEND.value:
        lines = [
            "",
            f"### AOT memory: {header}",
            "",
            f"- command: `python benchmarks/aot_memory.py {' '.join(sys.argv[1:])}`",
            f"- machine: {platform.node() or 'host'} ({os.cpu_count()} CPU cores), jax {jax.__version__}, "
            f"date {datetime.date.today().isoformat()}",
            "",
            "| remat | argument GiB | output GiB | alias GiB | temp GiB | total GiB/device | lower s | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['remat']} | {r['argument']:.2f} | {r['output']:.2f} | {r['alias']:.2f} | {r['temp']:.2f} | "
                f"**{r['total']:.2f}** | {r['lower_s']:.0f} | {r['compile_s']:.0f} |"
            )
        with open(_APPEND.value, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)

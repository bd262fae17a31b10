"""Train-step throughput of any config on the local devices: images/s/device, TFLOP/s/device and MFU.

    python benchmarks/throughput.py --config=configs/unitok.py:tiny [--steps=10] [--gan] [--per_device_batch=N]
    python benchmarks/throughput.py --config=configs/unitok.py:b16_single_gpu --steps=20 --append_results=benchmarks/RESULTS.md
    python benchmarks/throughput.py --config=configs/unitok.py:tiny --num_devices=8   # fake CPU devices

Compile time is measured separately (lower + compile), then `--steps` timed steps on a fixed synthetic batch (the
input pipeline is not part of the measurement; see the trainer's perf/time/data_wait for that). Model FLOPs are the
analytic count of unitok_jax.train.flops (x3 trained, x2 frozen on the gradient path, x1 forward-only; no remat
recompute); XLA's own per-device count (`cost_analysis`, includes recompute and elementwise work) is printed too.
MFU uses the chip's dense bf16 peak (flops.PEAK_FLOPS); it is n/a on CPU. Pretrained frozen weights (LPIPS, DINOv2)
are random when no path is configured: timing does not depend on their values.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/unitok.py:tiny")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_GAN = flags.DEFINE_bool("gan", False, "time the GAN-active step (generator + discriminator update)")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", None, "override the global batch = this x devices")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "CPU only: fake devices (set before JAX initialises)")
_APPEND = flags.DEFINE_string("append_results", "", "append a markdown row to this file")


def _random_frozen_weights(config):
    """Random LPIPS when no weights file is given (the timing does not depend on the values)."""
    from flax import nnx

    from unitok_jax.models.lpips import LPIPS
    from unitok_jax.train import trainer

    if config.loss.lpips and not config.loss.lpips_path:
        trainer._load_frozen_weights = lambda _config: LPIPS(nnx.Rngs(0))


def synthetic_batch(config, mesh):
    import numpy as np

    from unitok_jax.parallel import sharding as shd

    import jax

    b = config.global_batch_size // jax.process_count()
    s = int(config.data.image_size)
    rng = np.random.default_rng(0)
    local = {"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)}
    if config.model.get("text"):
        t = int(config.data.context_length)
        text = rng.integers(1, min(int(config.model.text.vocab_size) - 1, 1000), (b, t)).astype(np.int32)
        text[:, -1] = int(config.model.text.vocab_size) - 1  # EOT = the largest id, pooled by argmax
        local["text"] = text
    return shd.to_global_batch(local, mesh)


def main(_):
    import jax
    import numpy as np

    from unitok_jax.train import aot, flops, trainer

    config = _CONFIG.value
    n = jax.device_count()
    if _PER_DEVICE_BATCH.value:
        config.global_batch_size = _PER_DEVICE_BATCH.value * n
    _random_frozen_weights(config)
    components = trainer.build_components(config)
    mesh = components.mesh
    with jax.set_mesh(mesh):
        state = components.init_state()
    frozen = components.init_frozen()
    batch = synthetic_batch(config, mesh)
    steps = trainer.jit_train_steps(components, jax.tree.map(lambda x: x.sharding, batch))
    gan = bool(_GAN.value)
    if gan not in steps:
        raise app.UsageError("this config has no discriminator; drop --gan")

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = steps[gan].lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / max(_STEPS.value, 1)

    b = config.global_batch_size
    model_flops = flops.step_flops(config, gan_active=gan).total
    tflops_dev = model_flops / step_s / n / 1e12
    peak = flops.peak_flops_per_device(jax.devices()[0])
    mfu = tflops_dev * 1e12 / peak if peak else float("nan")
    xla_dev = aot.xla_flops(compiled)
    mem = aot.memory_summary(compiled)
    dev = jax.devices()[0]
    kind = f"{n}x {dev.device_kind}" if dev.platform != "cpu" else f"{n} CPU device(s), {os.cpu_count()} cores"
    loss = float(np.asarray(metrics["train/loss/total"]))
    print(
        f"{config.get('variant', '?')} ({'gan' if gan else 'no gan'}) on {kind}: batch {b} ({b // n}/device), "
        f"compile {compile_s:.1f}s, step {step_s * 1e3:.1f} ms, {b / step_s / n:.2f} images/s/device, "
        f"model {model_flops / b / 1e9:.2f} GFLOP/image -> {tflops_dev:.3f} TFLOP/s/device, "
        f"MFU {'n/a' if not peak else f'{mfu:.1%}'}; XLA flops/device/step {xla_dev:.3g} "
        f"(model {model_flops / n:.3g}); memory/device {mem['total']:.2f} GiB; loss {loss:.4f}"
    )
    if _APPEND.value:
        row = (
            f"| {config.get('variant', '?')} | {'gan' if gan else 'no gan'} | {kind} | {b} | {compile_s:.1f} | "
            f"{step_s * 1e3:.1f} | {b / step_s / n:.2f} | {tflops_dev:.3f} | {'n/a' if not peak else f'{mfu:.1%}'} | "
            f"{platform.node() or 'host'}, jax {jax.__version__}, {datetime.date.today().isoformat()} | "
            f"`python benchmarks/throughput.py {' '.join(sys.argv[1:])}` |"
        )
        with open(_APPEND.value, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg.startswith("--num_devices="):
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            os.environ["XLA_FLAGS"] = " ".join(
                [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                + [f"--xla_force_host_platform_device_count={int(arg.split('=', 1)[1])}"]
            )
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)

"""Time the train step of a config on the local devices (compile reported separately).

python benchmarks/step_time.py --config=configs/unitok.py:tiny [--steps=20] [--gan]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_GAN = flags.DEFINE_bool("gan", False, "time the GAN-active step variant")


def main(_):
    from unitok_jax.parallel import sharding as shd
    from unitok_jax.train import trainer

    config = _CONFIG.value
    components = trainer.build_components(config)
    mesh = components.mesh
    with jax.set_mesh(mesh):
        state = components.init_state()
    frozen = components.init_frozen()
    b, size, ctx = config.global_batch_size, config.data.image_size, config.data.context_length
    rng = np.random.default_rng(0)
    local = {
        "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
        "text": rng.integers(1, 200, (b, ctx)).astype(np.int32),
    }
    local["text"][:, -1] = 258
    batch = shd.to_global_batch(local, mesh)
    steps = trainer.jit_train_steps(components, jax.tree.map(lambda x: x.sharding, batch))
    fn = steps[_GAN.value]
    t0 = time.perf_counter()
    state, metrics = fn(state, frozen, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = fn(state, frozen, batch)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - t0) / _STEPS.value
    print(
        f"devices={jax.device_count()} ({jax.devices()[0].platform}) batch={b} compile+first={compile_s:.1f}s "
        f"step={per_step:.3f}s images/s={b / per_step:.1f} gan={_GAN.value}"
    )


if __name__ == "__main__":
    app.run(main)

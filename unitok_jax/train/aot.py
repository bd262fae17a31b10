"""Ahead-of-time compilation of the train step from abstract inputs (no parameter or batch is allocated).

Used by benchmarks/aot_memory.py (per-device memory of the paper config on a fake pod), benchmarks/throughput.py
(compile time) and tests/test_flops.py (XLA's FLOP count). Pretrained frozen weights (LPIPS) are replaced by their
abstract shapes when no file is configured: only shapes matter for compilation.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.parallel import sharding as shd
from unitok_jax.train import trainer

GiB = 2**30


@contextlib.contextmanager
def abstract_frozen_weights(config):
    """Within the block, `trainer.build_components` uses an abstract LPIPS when `loss.lpips_path` is empty."""
    from unitok_jax.models.lpips import LPIPS

    original = trainer._load_frozen_weights
    if config.loss.lpips and not config.loss.lpips_path:
        trainer._load_frozen_weights = lambda _config: nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0)))
    try:
        yield
    finally:
        trainer._load_frozen_weights = original


def build_abstract_components(config, mesh=None) -> trainer.Components:
    with abstract_frozen_weights(config):
        return trainer.build_components(config, mesh=mesh)


def abstract_step_inputs(config, components: trainer.Components) -> tuple[Any, dict, dict]:
    """(abstract state, abstract frozen tree, abstract batch) matching `train_step(state, frozen, batch)`."""
    seed = int(config.seed)
    model = nnx.eval_shape(lambda: trainer._build_model(config, seed))
    _, _, model_rest = nnx.split(model, nnx.Param, ...)
    disc_rest = nnx.State({})
    if components.ctx.disc_graphdef is not None:
        disc = nnx.eval_shape(lambda: trainer._build_discriminator(config, seed))
        _, _, disc_rest = nnx.split(disc, nnx.Param, ...)
    lpips = None
    if components.ctx.lpips_graphdef is not None:
        from unitok_jax.models.lpips import LPIPS

        lpips = nnx.split(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))[1]
    frozen = {"model_rest": model_rest, "disc_rest": disc_rest, "lpips": lpips}
    for key in components.frozen_shardings:  # other frozen inputs of newer steps (e.g. a teacher) are absent here
        frozen.setdefault(key, None)
    b, s = int(config.global_batch_size), int(config.data.image_size)
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)}
    if config.model.get("text"):
        batch["text"] = jax.ShapeDtypeStruct((b, int(config.data.context_length)), jnp.int32)
    return components.abstract_state, frozen, batch


def compile_train_step(config, *, gan: bool, mesh=None, components: trainer.Components | None = None):
    """Lower + compile one train-step variant abstractly. Returns (compiled, components, lower_s, compile_s)."""
    components = components or build_abstract_components(config, mesh)
    state, frozen, batch = abstract_step_inputs(config, components)
    batch_sh = {k: shd.batch_sharding(components.mesh, v.ndim) for k, v in batch.items()}
    steps = trainer.jit_train_steps(components, batch_sh)
    if gan not in steps:
        raise ValueError("the config has no discriminator / GAN loss: compile the gan=False step")
    t0 = time.perf_counter()
    with jax.set_mesh(components.mesh):
        lowered = steps[gan].lower(state, frozen, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, components, t1 - t0, time.perf_counter() - t1


def memory_summary(compiled) -> dict[str, float]:
    """Per-device GiB from `compiled.memory_analysis()`; donated state makes outputs alias arguments, so the
    peak is about argument + temp + (output - alias)."""
    m = compiled.memory_analysis()
    arg, out, temp, alias = (
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.temp_size_in_bytes,
        m.alias_size_in_bytes,
    )
    return {
        "argument": arg / GiB,
        "output": out / GiB,
        "temp": temp / GiB,
        "alias": alias / GiB,
        "code": m.generated_code_size_in_bytes / GiB,
        "total": (arg + out - alias + temp) / GiB,
    }


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))

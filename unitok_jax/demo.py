"""Demo checkpoints for the colabs and tests: a shrunk tiny config and a checkpoint written in seconds on a CPU.

Above both `train` and `evals` (it builds a TrainState and may run the trainer), so neither imports it.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unitok_jax import paths
from unitok_jax.evals.config import default_eval_config
from unitok_jax.load import abstract_model, concrete_rest
from unitok_jax.models.init_keys import numpy_fill_
from unitok_jax.train import checkpointing, optimizers, trainer
from unitok_jax.train.state import TrainState, initial_counters


def demo_config(
    base: ml_collections.ConfigDict,
    *,
    data_dir: str = "",
    image_size: int = 32,
    num_train: int = 64,
    num_eval: int = 32,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """A copy of a tiny UniTok config (`configs/unitok.py:tiny`) shrunk so a CPU compiles it in seconds; the
    embedded dataset is made small too."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.seed = seed
    c.total_steps = max(int(c.total_steps), 1)
    c.async_checkpointing = False
    c.global_batch_size = 8
    c.eval_batch_size = 16
    c.log_every_steps = 1
    c.ckpt_every_steps = 1000
    c.image_every_steps = 1000
    c.data.image_size = image_size
    c.model.image_size = image_size
    c.data.data_dir = data_dir
    c.data.embedded.update(dict(num_train=num_train, num_eval=num_eval, image_size=image_size))
    c.data.context_length = 16
    c.model.text.context_length = 16
    c.model.encoder.update(dict(stage_depths=(1, 1), vit_depth=1))
    c.model.decoder.update(dict(vit_depth=1, inv_mbconv_depths=(1, 1)))
    c.loss.gan = 0.0
    c.loss.lpips = 0.0
    c.eval = default_eval_config()
    c.eval.grid_images = 8
    return c


def create_demo_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, train_steps: int = 0, seed: int | None = None
) -> str:
    """Write a checkpoint of `config` into `workdir` and return the workdir.

    train_steps == 0: step 0 with `random_model(config, seed)` params plus optimizer state and counters, saved
    by the trainer's Checkpointer exactly as training saves them — seconds on a CPU (needs loss.gan = 0).
    train_steps > 0: run the trainer for that many steps (the train step compiles for minutes on 2 CPU cores).
    An existing checkpoint of that step is reused.
    """
    ckpts = paths.join(workdir, "checkpoints")
    if train_steps in checkpointing.checkpoint_steps(ckpts):
        return workdir
    if train_steps > 0:
        c = ml_collections.ConfigDict(config.to_dict())
        c.total_steps = train_steps
        c.ckpt_every_steps = train_steps
        trainer.train(c, workdir)
        return workdir
    state = _initial_train_state(config, int(config.seed) if seed is None else seed)
    ckpt = checkpointing.Checkpointer(ckpts, async_save=False)
    try:
        ckpt.save(0, state, None, json.loads(config.to_json_best_effort()), force=True)
    finally:
        ckpt.close()
    return workdir


def random_model(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """A tokenizer of `config.model` with random params filled from a host numpy RNG (`init_keys.numpy_fill_`:
    N(0, 1/fan_in) kernels, ...; not the training init). About a second on a CPU, where `nnx` init compiles one
    kernel per random op (a minute for the tiny model on 2 cores)."""
    model = numpy_fill_(abstract_model(config), seed)
    model.logit_scale.set_value(jnp.asarray(math.log(1 / 0.07), jnp.float32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, concrete_rest(config, rest))


def _initial_train_state(config, seed: int) -> TrainState:
    """A trainer-format TrainState (params, optimizer state, counters) around `random_model` params."""
    if bool(config.loss.gan) and config.discriminator.name != "none":
        raise ValueError("create_demo_checkpoint(train_steps=0) writes generator-only states: set loss.gan=0")
    _, params, _ = nnx.split(random_model(config, seed), nnx.Param, ...)
    tx = optimizers.make_optimizer(config.optimizer, params, config.total_steps)
    return TrainState(
        params=params,
        opt_state=jax.jit(tx.init)(params),
        disc_params=nnx.State({}),
        disc_opt_state=nnx.State({}),
        rng=jax.random.key_data(jax.random.key(seed)),
        **initial_counters(),
    )

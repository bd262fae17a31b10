"""Load a tokenizer: from one of our runs (a run dir, its checkpoints/, a step dir or a step number) or an official
weight file. The one entry point shared by `evaluate`, `export_codes`, `reconstruct`, the benchmarks and the colabs.

    model, step = load_tokenizer("runs/tiny")                       # newest step; config saved with the run
    run = load_run("runs/tiny", config=None)                        # + the config and the resolved step dir
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from unitok_jax import paths
from unitok_jax.convert.official import load_unitok
from unitok_jax.models import build_model
from unitok_jax.train.checkpointing import checkpoint_config, resolve_checkpoint, restore_params_only


@dataclasses.dataclass
class LoadedRun:
    model: nnx.Module
    step: int | None  # None for an official weight file
    config: ml_collections.ConfigDict  # the run's saved config, or the one given
    path: str  # the step directory, or the weight file


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The tokenizer `config.model` describes, with shapes only (no params allocated)."""
    return nnx.eval_shape(lambda: build_model(_model_name(config), config.model, rngs=nnx.Rngs(params=0, dropout=1)))


def concrete_rest(config: ml_collections.ConfigDict, abstract_rest):
    """Non-Param model state (RNG streams) without initialising the params (XLA drops the unused init)."""
    if not jax.tree.leaves(abstract_rest):
        return abstract_rest

    def rest():
        model = build_model(_model_name(config), config.model, rngs=nnx.Rngs(params=0, dropout=1))
        return nnx.split(model, nnx.Param, ...)[2]

    return jax.jit(rest)()


def _model_name(config) -> str:
    return str(config.get("model_name", "unitok"))


def load_tokenizer(
    checkpoint: str | int | os.PathLike, config: ml_collections.ConfigDict | None = None, *, workdir: str | None = None
) -> tuple[nnx.Module, int | None]:
    """(tokenizer, step) from one of our checkpoints or an official weight file.

    Ours: only the params are read, onto this process's first device; the model is built from the config saved with
    the checkpoint (training overrides need not be repeated); `config` is the fallback when none was saved.
    Official: a `.pth` (needs torch, see torch_io), or an `.npz` {official key: array} (a `param/` prefix is
    stripped, as in tests/fixtures), converted by `convert.official.load_unitok` (config from the checkpoint args /
    tensor shapes, or `config.model` for .npz); the step is None then.
    """
    run = load_run(checkpoint, config, workdir=workdir, require_config=False)
    return run.model, run.step


def load_run(
    checkpoint: str | int | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    *,
    workdir: str | None = None,
    require_config: bool = True,
) -> LoadedRun:
    """`load_tokenizer` plus the config the CLIs need for data and eval settings: `config` when given, else the one
    saved with the checkpoint (an official file, or a run saved without one, then needs `config`: ValueError)."""
    path = resolve_checkpoint(checkpoint, workdir)
    if any(part.endswith(".damaged") for part in path.replace("\\", "/").split("/")):
        # Training moved this step aside because it failed to restore or was never committed (checkpointing.py).
        logging.warning("%s is under a '.damaged' directory: training set it aside as unreadable or uncommitted", path)
    if paths.isfile(path):
        if config is None and require_config:
            raise ValueError(f"{path} is an official weight file: pass a config (data and eval settings)")
        return LoadedRun(_load_official(config, path), None, config, path)
    saved = checkpoint_config(path)
    source = saved if saved is not None and "model" in saved else config
    if source is None:
        raise ValueError(f"{path} has no saved config: pass the training config")
    if config is not None and saved is not None and "model" in config:
        if json.loads(config.model.to_json_best_effort()) != json.loads(saved.model.to_json_best_effort()):
            logging.warning("config.model differs from the config saved with %s; using the saved one", path)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(source), nnx.Param, ...)
    params = restore_params_only(path, abstract_params)
    model = nnx.merge(graphdef, params, concrete_rest(source, abstract_rest))
    return LoadedRun(model, int(paths.basename(path)), config if config is not None else source, path)


def _load_official(config, path: str) -> Any:
    if path.endswith(".npz"):
        with np.load(paths.local_copy(path)) as z:
            sd = {k: np.asarray(z[k]) for k in z.files}
        if any(k.startswith("param/") for k in sd):
            sd = {k[len("param/") :]: v for k, v in sd.items() if k.startswith("param/")}
        model_cfg = config.model.to_dict() if config is not None and "model" in config else None
        return load_unitok(sd, model_cfg)
    return load_unitok(paths.local_copy(path))

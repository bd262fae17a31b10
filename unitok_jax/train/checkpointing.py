"""Orbax checkpoints of the train state, the Grain iterator state and the config, saved together.

Resume order (DESIGN.md): checkpoint in the workdir → explicit `resume_from` → `init_from` (params only) → scratch.
A damaged latest checkpoint (truncated, partially written) is skipped with a warning and the previous good one
is used, instead of crashing or silently starting from scratch.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

import grain


class RestoreError(RuntimeError):
    pass


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the target shardings, so Orbax restores straight into sharded arrays."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items 'state', 'data' (Grain iterator) and 'config'."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator=None, config: dict | None = None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_good(self, abstract_state, data_iterator=None, on_damaged: Callable[[int, Exception], None] | None = None):
        """Try checkpoints newest first; return (step, state) of the first that restores, or (None, None)."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # damaged: truncated file, missing item, bad metadata, ...
                logging.warning("checkpoint at step %d in %s is damaged (%s: %s); falling back to the previous one",
                                step, self.directory, type(e).__name__, e)
                if on_damaged:
                    on_damaged(step, e)
        return None, None

    def restore_config(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step), "config", "metadata")
        with open(path) as f:
            return json.load(f)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params_only(path: str, abstract_params) -> Any:
    """`init_from`: load only the generator params of another run's checkpoint (step dir or run dir)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(os.path.join(path, "state")):
        steps = sorted(int(d) for d in os.listdir(path) if d.isdigit())
        if not steps:
            raise RestoreError(f"init_from={path!r}: no checkpoint steps found")
        path = os.path.join(path, str(steps[-1]))
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(os.path.join(path, "state"))
    return restored["params"]

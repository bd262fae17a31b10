"""Orbax checkpoints of the train state, the Grain iterator state and the config, saved together.

Resume order: checkpoint in the workdir → explicit `resume_from` → `init_from` (params only) → scratch.

Damage policy (`Checkpointer.restore_latest_good`):
- A save interrupted by a kill leaves an Orbax `<step>.orbax-checkpoint-tmp*` directory: it is never listed as a
  step and is deleted when the next manager opens the directory (`cleanup_tmp_directories`).
- A step directory without its `commit_success.txt` marker (written last, just before the atomic rename / commit)
  counts as uncommitted, and one that fails to restore (truncated or missing array files, unreadable metadata,
  missing item) as damaged. Both are skipped newest-first with a warning; once an older step restores, the skipped
  ones are moved to `<directory>.damaged/` (kept for inspection, out of the way of re-saving those steps).
- If committed checkpoints exist but none restores, `RestoreError` is raised and nothing is moved: silently
  restarting from scratch would overwrite a run's history (and a config whose shapes no longer match the
  checkpoints lands here too). Move the directory away to really start over. Only uncommitted saves (the very
  first save was killed) are moved aside and the run starts from scratch: nothing had been committed yet.
- Not detected: bit flips inside array files (OCDBT stores no checksums); they restore as wrong values.

Save failures (read-only or full disk, permission, a vanished bucket) raise `CheckpointSaveError` naming the newest
committed step, from `save` (directories are created synchronously, so a read-only directory fails there instead of
leaving the main thread waiting on Orbax's background signal for 20 minutes) or from `wait`/`close` (the async
write of the array files failed). Directories may be local or object-store URLs (`gs://`, see `unitok_jax.paths`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

import grain

from unitok_jax import paths


class RestoreError(RuntimeError):
    pass


class CheckpointNotFoundError(RestoreError, FileNotFoundError):
    """No checkpoint where one was named (a missing path, a step that was never saved, an empty run)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the directory, the cause and the newest good step."""


# Orbax writes this file last, right before the atomic rename (local disks) or as the commit (GCS).
COMMIT_MARKER = "commit_success.txt"


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the target shardings, so Orbax restores straight into sharded arrays."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def configure_array_saving() -> None:
    """Save each array's shards from one replica when a single process holds every replica.

    Orbax's default on CPU/TPU is "replica-parallel" saving: every replica of a replicated array writes a 1/N slice,
    which spreads the writes over hosts in a multi-host job. With one process the same process writes all N slices,
    and each slice is a separate device op compiled per distinct shape: for the tiny model on 8 devices that is ~4400
    slice ops and ~15 s per save for nothing. Multi-host jobs keep replica-parallel saving, but only for slices of
    at least 1 MiB (splitting a LayerNorm bias eight ways saves no I/O time).
    """
    global _ARRAY_SAVING_MULTI_HOST
    multi_host = jax.process_count() > 1
    if _ARRAY_SAVING_MULTI_HOST == multi_host:  # registered already (re-registering logs a warning each time)
        return
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=multi_host, min_slice_bytes_for_replica_parallel=2**20 if multi_host else None
    )
    # Orbax warns on every override ("overriding jax.Array"); this one is deliberate, so say so at INFO instead.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        logging.set_verbosity(verbosity)
    logging.info(
        "checkpoints: replica-parallel array saving %s", "on (>= 1 MiB slices)" if multi_host else "off (one process)"
    )
    _ARRAY_SAVING_MULTI_HOST = multi_host


_ARRAY_SAVING_MULTI_HOST: bool | None = None


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items 'state', 'data' (Grain iterator) and 'config'."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        timeout_secs: int = 1200,
    ):
        """`read_only`: another run's directory (`resume_from`): nothing there is cleaned up, moved or written.
        `timeout_secs`: how long hosts wait for each other to finish an async save before it counts as failed."""
        self.directory = paths.resolve(directory)
        self.read_only = read_only
        configure_array_saving()
        # cleanup_tmp_directories: a save killed half-way leaves '<step>.orbax-checkpoint-tmp*'; drop it on open.
        # create_directories_asynchronously=False: Orbax's default creates the step directory in a background
        # thread, and when that fails (read-only file system) the main thread waits for its signal until the
        # timeout (measured: a hang of >= 4 min at the first save). Synchronously, `save` raises at once.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            async_options=ocp.options.AsyncOptions(
                timeout_secs=int(timeout_secs), create_directories_asynchronously=False
            ),
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data_position": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state,
        data_iterator=None,
        config: dict | None = None,
        *,
        force: bool = False,
        data_position: dict | None = None,
    ) -> bool:
        """Starts saving `step` (async by default). `data_position`: the topology-free data position (see
        `trainer._data_position`), stored as its own JSON item so a run can resume on another process count."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if data_position is not None:
            items["data_position"] = ocp.args.JsonSave(data_position)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 — Orbax/TensorStore/OS errors of every kind end the same way
            raise self._save_error(f"saving step {step}", e) from e

    def _save_error(self, what: str, e: Exception) -> CheckpointSaveError:
        try:
            committed = [s for s in self.step_dirs() if self.is_committed(s)]
        except Exception:  # noqa: BLE001 — the directory may be unreadable too
            committed = []
        newest = (
            f"the newest committed checkpoint is step {committed[-1]} in {self.directory}; rerun after fixing "
            f"the cause to resume from it"
            if committed
            else f"no checkpoint has been committed in {self.directory} yet"
        )
        return CheckpointSaveError(
            f"{what} failed ({type(e).__name__}: {_short(e)}). Check that the directory is "
            f"writable and has free space; {newest}."
        )

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The state at `step`; `data_iterator` is put at the saved data position.

        When the checkpoint was written by another number of processes, Grain's per-process iterator files do not
        match this run's; the iterator is then placed from the topology-free `data_position` item instead
        (`pipeline.restore_global_position`). Params and optimizer state always restore onto `abstract_state`'s
        shardings, whatever mesh wrote them.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        saved_processes = self.saved_process_count(step)
        elastic = data_iterator is not None and saved_processes not in (None, jax.process_count())
        if data_iterator is not None and not elastic:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if elastic:
            if not (paths.path(self.directory) / str(step) / "data_position").exists():
                raise RestoreError(
                    f"step {step} was saved by {saved_processes} process(es) and has no data_position "
                    f"item (written by an older version), so it cannot resume on {jax.process_count()}"
                )
            items["data_position"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if elastic:
            from unitok_jax.data import pipeline

            position = dict(restored["data_position"])
            pipeline.restore_global_position(data_iterator, position)
            logging.warning(
                "step %d was saved by %d process(es); this run has %d: params and optimizer state were "
                "resharded and the data stream continues at global example %d",
                step,
                saved_processes,
                jax.process_count(),
                int(position["next_global_index"]),
            )
        return restored["state"]

    def saved_process_count(self, step: int) -> int | None:
        """Number of processes that wrote `step`'s data item (from Grain's `process_<i>-of-<n>.json` names)."""
        names = paths.listdir(paths.join(self.directory, str(step), "data"))
        counts = {int(m.group(1)) for m in (re.match(r"process_\d+-of-(\d+)\.json$", n) for n in names) if m}
        return counts.pop() if len(counts) == 1 else None

    def step_dirs(self) -> list[int]:
        """Steps Orbax lists plus any other all-digit directory (so nothing damaged is silently ignored)."""
        steps = set(self.manager.all_steps())
        root = epath.Path(self.directory)
        if root.exists():
            steps.update(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
        return sorted(steps)

    def is_committed(self, step: int) -> bool:
        return (epath.Path(self.directory) / str(step) / COMMIT_MARKER).exists()

    def restore_latest_good(
        self, abstract_state, data_iterator=None, on_damaged: Callable[[int, Exception], None] | None = None
    ):
        """Newest restorable checkpoint as (step, state), or (None, None) if no committed checkpoint exists.

        Uncommitted or damaged newer steps are skipped with a warning (and moved aside once an older one restores);
        raises `RestoreError` if committed checkpoints exist but none restores. See the module docstring.
        """
        skipped: list[tuple[int, Exception]] = []
        committed_failures = 0
        for step in reversed(self.step_dirs()):
            committed = self.is_committed(step)
            try:
                if not committed:
                    raise RestoreError(f"no {COMMIT_MARKER}: the save of step {step} never completed")
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # damaged: truncated file, missing item, bad metadata, uncommitted, ...
                logging.warning(
                    "checkpoint at step %d in %s is damaged (%s: %s); trying the previous one",
                    step,
                    self.directory,
                    type(e).__name__,
                    _short(e),
                )
                skipped.append((step, e))
                committed_failures += committed
                if on_damaged:
                    on_damaged(step, e)
                continue
            if skipped and not self.read_only:
                self._move_aside([s for s, _ in skipped])
                logging.warning(
                    "resuming from step %d in %s; damaged newer checkpoint(s) %s moved to %s",
                    step,
                    self.directory,
                    [s for s, _ in skipped],
                    self.damaged_directory,
                )
            return step, state
        if committed_failures:
            details = "; ".join(f"step {s}: {type(e).__name__}: {_short(e)}" for s, e in skipped)
            raise RestoreError(
                f"none of the {len(skipped)} checkpoint(s) in {self.directory} can be restored ({details}). Refusing to "
                f"start from scratch over them: if the run's config changed, restore it; to really start over, move "
                f"{self.directory} away (or point the run at a new --workdir)."
            )
        if skipped and not self.read_only:  # only saves that never completed (e.g. the first one was killed)
            self._move_aside([s for s, _ in skipped])
            logging.warning(
                "no committed checkpoint in %s; incomplete save(s) %s moved to %s",
                self.directory,
                [s for s, _ in skipped],
                self.damaged_directory,
            )
        return None, None

    @property
    def damaged_directory(self) -> str:
        return self.directory.rstrip("/") + ".damaged"

    def _move_aside(self, steps: list[int]) -> None:
        """Moves skipped step dirs out of the manager's directory (process 0; every process waits for it)."""
        if jax.process_index() == 0:
            target_root = epath.Path(self.damaged_directory)
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = epath.Path(self.directory) / str(step)
                if not source.exists():
                    continue
                target, n = target_root / str(step), 1
                while target.exists():
                    target, n = target_root / f"{step}.{n}", n + 1
                source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unitok_jax_checkpoint_move_aside")
        self.manager.reload()

    def wait(self):
        """Blocks until pending async saves are committed; CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error("an asynchronous checkpoint save", e) from e

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()


def _path_names(path) -> tuple[str, ...]:
    """A pytree path as plain strings: nnx.State (DictKey, GetAttrKey 'value') and the dicts Orbax restores
    ('0' for list indices) then compare equal."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def resolve_checkpoint(checkpoint: str | int | os.PathLike, workdir: str | None = None) -> str:
    """The step directory (holding `state/`) meant by `checkpoint`: a step number (with `workdir`), a run workdir,
    its `checkpoints/` directory (newest step) or a step directory. A file (official weights) is returned as is.
    The one resolver shared by restore, `init_from`, evaluate, export_codes, reconstruct and the colabs."""
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        if not workdir:
            raise ValueError(f"checkpoint={checkpoint!r} is a step number: also pass workdir (the run directory)")
        directory = _checkpoints_dir(paths.resolve(workdir))
        path = paths.join(directory, str(int(checkpoint)))
        if not paths.isdir(paths.join(path, "state")):
            raise CheckpointNotFoundError(
                f"no checkpoint for step {checkpoint} in {directory} (available: {checkpoint_steps(directory)})"
            )
        return path
    path = paths.resolve(checkpoint)
    if paths.isfile(path):
        return path
    if not paths.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    if paths.isdir(paths.join(path, "state")):
        return path
    directory = _checkpoints_dir(path)
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointNotFoundError(
            f"{directory!r}: no checkpoint steps found (expected <run>/checkpoints/<step>/state)"
        )
    return paths.join(directory, str(steps[-1]))


def _checkpoints_dir(path: str) -> str:
    sub = paths.join(path, "checkpoints")
    return sub if paths.isdir(sub) else path


def checkpoint_steps(directory: str) -> list[int]:
    """Steps under a checkpoints directory that hold a `state/` item, ascending ([] when it does not exist)."""
    if not paths.isdir(directory):
        return []
    return sorted(
        int(d) for d in paths.listdir(directory) if d.isdigit() and paths.isdir(paths.join(directory, d, "state"))
    )


def checkpoint_config(step_dir: str) -> ml_collections.ConfigDict | None:
    """The training config saved next to a checkpoint (None when absent)."""
    path = paths.join(step_dir, "config", "metadata")
    if not paths.exists(path):
        return None
    return ml_collections.ConfigDict(paths.read_json(path))


def restore_params_only(path: str, abstract_params=None) -> Any:
    """Only the generator params of a checkpoint (step dir, checkpoints dir or run dir), on any device topology.

    Used by `init_from`, tests and tools. The checkpoint may come from another mesh or process count, so the saved
    shardings are ignored. With `abstract_params` (a pytree of ShapeDtypeStruct, e.g. the trainer's nnx.State or
    `nnx.eval_shape`'s; leaves without a `.sharding` go to the first local device) every leaf is read straight into its target sharding and cast to its dtype, and the
    result has `abstract_params`' structure; parameter names and shapes must match (RestoreError names the first
    differences). Without it, the saved tree (plain dicts) comes back on the first local device. Nothing but
    `params` is read.
    """
    state_dir = paths.join(resolve_checkpoint(path), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(state_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        if "params" not in tree:
            raise RestoreError(f"{state_dir}: no 'params' in this checkpoint (items: {sorted(tree)})")
        saved = tree["params"]
        if abstract_params is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        else:
            target = _target_like_saved(saved, abstract_params, state_dir)
        restore_args = jax.tree.map(
            lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), target
        )
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )["params"]
    if abstract_params is None:
        return restored
    by_name = {_path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    return jax.tree_util.tree_unflatten(treedef, [by_name[_path_names(p)] for p, _ in flat])


def _target_like_saved(saved, abstract_params, where: str):
    """The saved tree's structure with `abstract_params`' shapes, dtypes and shardings (matched by name)."""
    wanted = {_path_names(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    have = {_path_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    missing, unexpected = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(have) if tuple(wanted[k].shape) != tuple(have[k].shape))
    if missing or unexpected or wrong:
        show = lambda keys: ", ".join("/".join(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")  # noqa: E731
        problems = [
            f"{len(missing)} param(s) not in the checkpoint: {show(missing)}" if missing else "",
            f"{len(unexpected)} checkpoint param(s) not in the model: {show(unexpected)}" if unexpected else "",
            "shape mismatch: "
            + ", ".join(f"{'/'.join(k)} {tuple(have[k].shape)} vs model {tuple(wanted[k].shape)}" for k in wrong[:5])
            if wrong
            else "",
        ]
        raise RestoreError(f"{where}: params do not match this model's: " + "; ".join(p for p in problems if p))
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # for abstract leaves without a sharding

    def target(p, m):
        want = wanted[_path_names(p)]
        return jax.ShapeDtypeStruct(m.shape, want.dtype, sharding=getattr(want, "sharding", None) or local)

    return jax.tree_util.tree_map_with_path(target, saved)

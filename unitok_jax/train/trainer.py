"""The one trainer: config → mesh → born-sharded state → jitted steps → checkpoints, metrics and image grids.

Multi-host discipline: every process runs the same control flow; per-process batches become global arrays;
only process 0 writes metrics/images; checkpoints are written collectively by Orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from clu import parameter_overview
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from unitok_jax import config_lib, paths
from unitok_jax.evals.config import evals_due
from unitok_jax.parallel import sharding as shd
from unitok_jax.train import checkpointing, flops, full_batch_accum, grad_accum, metric_writers, optimizers, perf
from unitok_jax.train import watchdog as watchdog_lib
from unitok_jax.train import step as step_lib
from unitok_jax.train.periodic_evals import run_periodic_evals
from unitok_jax.train.state import TrainState, initial_counters
from unitok_jax.train.validation import validate_config


class NonFiniteError(RuntimeError):
    pass


class WorkdirError(OSError):
    """The workdir cannot hold this run (not writable); raised before anything is compiled."""


class StepMemoryError(RuntimeError):
    """A compiled train step needs more device memory than the device has; raised before step 1."""


@dataclasses.dataclass
class Components:
    """Static pieces derived from the config: graph definitions, optimizers, shardings and the step context."""

    mesh: Any
    ctx: step_lib.StepContext
    init_state: Any  # () -> TrainState, jitted with out_shardings
    init_frozen: Any  # () -> frozen tree, jitted with out_shardings
    state_shardings: Any
    frozen_shardings: Any
    abstract_state: Any
    param_count: int
    grad_accum_steps: int = 1  # > 1: each step = that many micro-batches
    grad_accum_mode: str = "full_batch"  # train.full_batch_accum (exact) or "micro_batch" (train.grad_accum)
    grad_accum_unroll: bool = False  # unroll the micro-batch loop (see _grad_accum_unroll)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _build_model(config: ml_collections.ConfigDict, seed: int):
    from unitok_jax.models import build_model

    return build_model(config.model_name, config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def _model_dict(config: ml_collections.ConfigDict) -> dict:
    return config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) else dict(config.model)


def _build_discriminator(config: ml_collections.ConfigDict, seed: int):
    from unitok_jax.models.discriminators import build_discriminator

    return build_discriminator(config.discriminator.name, config.discriminator, rngs=nnx.Rngs(params=seed + 2))


def _load_frozen_weights(config: ml_collections.ConfigDict):
    """Pretrained frozen modules loaded from user paths (nothing is ever downloaded)."""
    lpips = None
    if config.loss.lpips:
        from unitok_jax.models.lpips import load_lpips

        lpips = load_lpips(config.loss.lpips_path)
    return lpips


def build_components(config: ml_collections.ConfigDict, mesh=None) -> Components:
    mesh = mesh or shd.create_mesh(config.mesh)
    rules = shd.resolve_rules(config.mesh.rules)
    seed = int(config.seed)
    gan_enabled = bool(config.loss.gan) and config.discriminator.name != "none"

    abstract_model = nnx.eval_shape(lambda: _build_model(config, seed))
    model_graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    tx = optimizers.make_optimizer(config.optimizer, abs_params, config.total_steps)
    gan_start = config_lib.resolve_steps(config.loss.gan_start, config.total_steps)
    gan_ramp = config_lib.resolve_steps(config.loss.gan_ramp, config.total_steps)

    disc_graphdef = disc_tx = None
    abs_disc_params = abs_disc_rest = nnx.State({})
    if gan_enabled:
        abstract_disc = nnx.eval_shape(lambda: _build_discriminator(config, seed))
        disc_graphdef, abs_disc_params, abs_disc_rest = nnx.split(abstract_disc, nnx.Param, ...)
        disc_tx = optimizers.make_optimizer(
            config.disc_optimizer, abs_disc_params, max(config.total_steps - gan_start, 1)
        )

    lpips_module = _load_frozen_weights(config)
    lpips_graphdef = lpips_state = None
    if lpips_module is not None:
        lpips_graphdef, lpips_state = nnx.split(lpips_module)

    teacher_graphdef = teacher_state = None
    if config.loss.get("distill", 0.0):
        from unitok_jax.convert.tokenflow import load_teacher

        teacher_graphdef, teacher_state = nnx.split(
            load_teacher(config.get("teacher_path") or None, _model_dict(config), seed=seed)
        )

    diffaug = None
    if gan_enabled:
        from unitok_jax.losses.diffaug import diff_augment

        aug = config.loss.diffaug
        diffaug = functools.partial(
            _diffaug_with_defaults, diff_augment, translation=aug.translation, color=aug.color, cutout=aug.cutout
        )

    ctx = step_lib.StepContext(
        model_graphdef=model_graphdef,
        tx=tx,
        weights=step_lib.LossWeights(
            l1=config.loss.l1,
            l2=config.loss.l2,
            lpips=config.loss.lpips,
            vq=config.loss.vq,
            clip=config.loss.clip,
            gan=config.loss.gan,
            adaptive_gan_weight=config.loss.adaptive_gan_weight,
            adaptive_clamp=tuple(config.loss.adaptive_clamp),
            bcr=config.loss.bcr,
            bcr_cutout=config.loss.bcr_cutout,
            distill=float(config.loss.get("distill", 0.0)),
        ),
        mesh=mesh,
        gan_start_step=gan_start,
        gan_ramp_steps=gan_ramp,
        logit_scale_max=float(config.model.clip.get("logit_scale_max", np.log(100.0)))
        if config.model.get("clip")
        else float(np.log(100.0)),
        disc_graphdef=disc_graphdef,
        disc_tx=disc_tx,
        lpips_graphdef=lpips_graphdef,
        diffaug=diffaug,
        model_takes_text=bool(abstract_model.takes_text),
        teacher_graphdef=teacher_graphdef,
    )

    repl = shd.replicated(mesh)
    param_sh = shd.state_shardings(abs_params, mesh, rules)
    rest_sh = shd.state_shardings(abs_rest, mesh, rules)
    disc_param_sh = shd.state_shardings(abs_disc_params, mesh, rules)
    disc_rest_sh = shd.state_shardings(abs_disc_rest, mesh, rules)

    def opt_shardings(opt, params_abstract, params_sh):
        abstract_opt = jax.eval_shape(opt.init, params_abstract)
        return optax_param_shardings(opt, abstract_opt, params_sh, repl)

    opt_sh = opt_shardings(tx, abs_params, param_sh)
    disc_opt_sh = opt_shardings(disc_tx, abs_disc_params, disc_param_sh) if gan_enabled else nnx.State({})
    state_sh = TrainState(
        step=repl,
        params=param_sh,
        opt_state=opt_sh,
        disc_params=disc_param_sh,
        disc_opt_state=disc_opt_sh,
        rng=repl,
        nonfinite_steps=repl,
        consecutive_nonfinite=repl,
    )

    def init_state_fn():
        _, params, _ = nnx.split(_build_model(config, seed), nnx.Param, ...)
        disc_params, disc_opt = nnx.State({}), nnx.State({})
        if gan_enabled:
            _, disc_params, _ = nnx.split(_build_discriminator(config, seed), nnx.Param, ...)
            disc_opt = disc_tx.init(disc_params)
        return TrainState(
            params=params,
            opt_state=tx.init(params),
            disc_params=disc_params,
            disc_opt_state=disc_opt,
            rng=jax.random.key_data(jax.random.key(seed)),
            **initial_counters(),
        )

    lpips_sh = shd.state_shardings(lpips_state, mesh, rules) if lpips_state is not None else None
    teacher_sh = shd.state_shardings(teacher_state, mesh, rules) if teacher_state is not None else None
    frozen_sh = {"model_rest": rest_sh, "disc_rest": disc_rest_sh, "lpips": lpips_sh, "teacher": teacher_sh}

    def init_frozen_fn():
        _, _, rest = nnx.split(_build_model(config, seed), nnx.Param, ...)
        disc_rest = nnx.State({})
        if gan_enabled:
            _, _, disc_rest = nnx.split(_build_discriminator(config, seed), nnx.Param, ...)
        return {"model_rest": rest, "disc_rest": disc_rest}

    init_frozen_jit = jax.jit(init_frozen_fn, out_shardings={"model_rest": rest_sh, "disc_rest": disc_rest_sh})

    def init_frozen():
        frozen = dict(init_frozen_jit())
        frozen["lpips"] = jax.device_put(lpips_state, lpips_sh) if lpips_state is not None else None
        frozen["teacher"] = jax.device_put(teacher_state, teacher_sh) if teacher_state is not None else None
        return frozen

    # Weights live FSDP-sharded but are used gathered (see parallel.sharding.compute_shardings).
    ctx = dataclasses.replace(
        ctx, compute_shardings=shd.compute_shardings({"params": param_sh, "disc_params": disc_param_sh, **frozen_sh})
    )

    with jax.set_mesh(mesh):
        abstract_state = jax.eval_shape(init_state_fn)
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
    return Components(
        mesh=mesh,
        ctx=ctx,
        init_state=jax.jit(init_state_fn, out_shardings=state_sh),
        init_frozen=init_frozen,
        state_shardings=state_sh,
        frozen_shardings=frozen_sh,
        abstract_state=abstract_state,
        param_count=param_count,
        grad_accum_steps=_grad_accum_steps(config, mesh),
        grad_accum_mode=_grad_accum_mode(config),
        grad_accum_unroll=_grad_accum_unroll(config, mesh),
    )


def _grad_accum_mode(config) -> str:
    return str(config.get("grad_accum_mode", "full_batch"))


def _grad_accum_steps(config, mesh) -> int:
    k = int(config.get("grad_accum_steps", 1) or 1)
    grad_accum.check_config(
        k, int(config.global_batch_size), mesh.shape["data"] * mesh.shape["fsdp"], _grad_accum_mode(config)
    )
    return k


def _grad_accum_unroll(config, mesh) -> bool:
    """`grad_accum_unroll` (None = auto): unroll on CPU, where XLA runs convolutions inside a while loop several
    times slower than outside one (jax-ml/jax#12868; measured here: a tiny UniTok step 15x slower as a 2-iteration
    scan). Accelerators keep the scan, whose strict order is what bounds memory to one micro-batch."""
    value = config.get("grad_accum_unroll", None)
    if value is not None:
        return bool(value)
    return mesh.devices.flat[0].platform == "cpu"


def _diffaug_with_defaults(fn, images, key, *, translation, color, cutout, **overrides):
    kwargs = dict(translation=translation, color=color, cutout=cutout)
    kwargs.update(overrides)
    return fn(images, key, **kwargs)


def optax_param_shardings(tx, abstract_opt_state, param_shardings, default):
    """Shardings for an optimizer state: moments follow their params, everything else (counts) is replicated."""
    import optax

    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: default,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )


def jit_train_steps(components: Components, batch_shardings) -> dict[bool, Any]:
    """Two compiled variants selected on the host: without and with the GAN."""
    steps = {}
    for gan_active in (False, True):
        if gan_active and components.ctx.disc_graphdef is None:
            continue
        fn = functools.partial(step_lib.train_step, ctx=components.ctx, gan_active=gan_active)
        if components.grad_accum_steps > 1 and components.grad_accum_mode == "full_batch":
            fn = functools.partial(
                full_batch_accum.full_batch_accumulated_train_step,
                ctx=components.ctx,
                gan_active=gan_active,
                num_micro_batches=components.grad_accum_steps,
                param_shardings=components.state_shardings.params,
                unroll=components.grad_accum_unroll,
            )
        elif components.grad_accum_steps > 1:
            fn = functools.partial(
                grad_accum.accumulated_train_step,
                ctx=components.ctx,
                gan_active=gan_active,
                num_micro_batches=components.grad_accum_steps,
                param_shardings=components.state_shardings.params,
                disc_param_shardings=components.state_shardings.disc_params,
                unroll=components.grad_accum_unroll,
            )
        steps[gan_active] = jax.jit(
            fn,
            in_shardings=(components.state_shardings, components.frozen_shardings, batch_shardings),
            out_shardings=(components.state_shardings, shd.replicated(components.mesh)),
            donate_argnums=(0,),
        )
    return steps


class _StopSignal:
    """SIGTERM (preemption notice) sets a flag; the loop finishes the step, checkpoints and exits cleanly.

    Single process only. With several processes JAX's preemption service (on by default after
    jax.distributed.initialize) owns SIGTERM and `reached_preemption_sync_point` makes every host stop at the same
    step; a Python handler would replace its notifier and a flag seen by one host alone would deadlock the
    collective checkpoint, so none is installed there.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def install(self):
        if jax.process_count() > 1:
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not in the main thread (e.g. some test runners)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        logging.warning("received signal %d: will checkpoint after this step and exit", signum)

    def uninstall(self):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _preemption_reached(step: int) -> bool:
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # the preemption service only exists with jax.distributed on supported platforms
        return False


def _host_sum(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _console(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[unitok_jax] {message}", flush=True)


def _nonfinite_error(count: int, step: int, limit: int, checkpointer) -> NonFiniteError:
    last = checkpointer.latest_step()
    kept = (
        f"the last good checkpoint (step {last}) is kept in {checkpointer.directory}"
        if last is not None
        else "no checkpoint had been written yet"
    )
    return NonFiniteError(
        f"{count} consecutive steps up to step {step} had non-finite loss or gradients (their updates were not "
        f"applied); stopping at config.max_consecutive_nonfinite={limit}. No checkpoint is written during such a "
        f"streak: {kept}. Check the data and the learning rate, then rerun to resume from it."
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`. Returns a summary with first/last logged metrics.

    Reliability contract (tests/test_reliability_*.py): rerunning after a kill resumes bit-exactly from the newest
    good checkpoint (state + Grain iterator; per-step RNG = fold_in(rng, step)); SIGTERM / a multi-host preemption
    sync point → finish the step, checkpoint, wait for async saves, return normally; `max_consecutive_nonfinite`
    non-finite steps in a row → `NonFiniteError`, and no checkpoint is ever written while such a streak is running.
    """
    from unitok_jax.data import pipeline

    validate_config(config)
    workdir = paths.resolve(workdir)
    checkpoint_dir = paths.join(workdir, "checkpoints")
    _check_workdir(workdir, checkpoint_dir)  # seconds, before any compile
    timers = perf.TimeBuckets()
    components = build_components(config)
    _warn_if_low_space(checkpoint_dir, components, int(config.keep_checkpoints))
    flops_meter = flops.FlopsMeter(config, jax.devices())  # perf/tflops_per_device, perf/mfu
    mesh = components.mesh
    max_nonfinite = int(config.max_consecutive_nonfinite)
    logging.info(
        "model %s: %.2f M trainable generator params; mesh %s",
        config.model_name,
        components.param_count / 1e6,
        dict(mesh.shape),
    )
    # clu's table (name, shape, dtype, size per parameter) goes to the log, not the console: thousands of rows.
    logging.info(
        "generator parameters:\n%s",
        parameter_overview.get_parameter_overview(
            nnx.to_pure_dict(components.abstract_state.params), include_stats=False
        ),
    )

    loader = pipeline.make_train_loader(config.data, global_batch_size=config.global_batch_size, seed=config.seed)
    data_iter = iter(loader)
    checkpointer = checkpointing.Checkpointer(
        checkpoint_dir,
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
        timeout_secs=int(config.get("checkpoint_timeout_secs", 1200)),
    )
    writer = None
    abstract = checkpointing.abstract_with_shardings(components.abstract_state, components.state_shardings)
    # Installed before restore and compilation: a preemption notice during them still ends in a checkpoint.
    stop = _StopSignal()
    stop.install()
    watchdog = _make_watchdog(config)
    first_metrics = last_metrics = None
    start_step = step = 0
    origin = "not started"
    try:
        with timers("restore"):
            state, start_step, origin = _restore_or_init(config, components, checkpointer, abstract, data_iter)
        # Rows of steps after the resumed one were written by an attempt killed before its next checkpoint.
        writer = metric_writers.MetricWriter(workdir, resume_step=start_step if start_step else None)
        frozen = components.init_frozen()
        _console(f"{origin}; training steps {start_step} → {config.total_steps}")

        steps = first_local = None
        if start_step < config.total_steps:
            # Every step variant the run will use is compiled now, so an out-of-memory or compile error of the GAN
            # step shows in the first minutes instead of at loss.gan_start (hours into a pod run).
            with timers("compile"):
                first_local = next(data_iter)
                steps = compile_train_steps(
                    components, config, state, frozen, _model_batch(first_local, mesh), start_step
                )
                # Hosts finish compiling at different times (one hits the compilation cache, another compiles for
                # minutes); the first step's collectives must not start until all have, or the early host's
                # collective times out (gloo: 30 s) and the run fails on every restart.
                _wait_for_every_host(f"unitok_jax_compiled_{start_step}", _startup_timeout_s(config))
        progress = metric_writers.ProgressLine(config.total_steps, start_step)
        preview = _preview_batch(config, mesh)
        reconstruct = jax.jit(functools.partial(_reconstruct, graphdef=components.ctx.model_graphdef))
        skipped_total, images_seen, window_start, window_steps = 0, 0, time.time(), 0
        pending_counter = None
        checkpoint_due = False  # a periodic checkpoint postponed by a non-finite streak
        step = start_step
        while step < config.total_steps:
            with timers("data_wait"):
                local = first_local if first_local is not None else next(data_iter)
                first_local = None
            skipped_total += int(np.sum(local.get("num_skipped", 0)))
            batch = _model_batch(local, mesh)
            gan_active = components.ctx.disc_graphdef is not None and step >= components.ctx.gan_start_step
            bucket = "first_step" if window_steps == 0 and step == start_step else "step"
            with timers(bucket):
                state, metrics = steps[gan_active](state, frozen, batch)
            step += 1
            window_steps += 1
            images_seen += config.global_batch_size

            # Non-finite guard: read the previous step's counter (one-step lag keeps the device busy).
            if pending_counter is not None and int(pending_counter) >= max_nonfinite:
                error = _nonfinite_error(int(pending_counter), step - 1, max_nonfinite, checkpointer)
                _console(f"stopping: {error}")
                raise error
            pending_counter = metrics["train/consecutive_nonfinite"]  # metrics are not donated; the state is
            watchdog.pet()  # step - 1 is done (the counter read above waited for it)

            # Also the first step of every invocation: the starting losses (and a resume's) are on record.
            if step % config.log_every_steps == 0 or step == config.total_steps or step == start_step + 1:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = max(time.time() - window_start, 1e-9)
                scalars["perf/images_per_sec"] = window_steps * config.global_batch_size / elapsed
                scalars["perf/images_per_sec_per_device"] = scalars["perf/images_per_sec"] / jax.device_count()
                scalars["perf/steps_per_sec"] = window_steps / elapsed
                scalars.update(flops_meter.metrics(scalars["perf/steps_per_sec"], gan_active))
                scalars["data/skipped"] = _host_sum(skipped_total)
                scalars["train/lr"] = float(optimizers.learning_rate(config.optimizer, config.total_steps, step))
                scalars.update(timers.as_metrics())
                writer.write_scalars(step, scalars)
                metric_writers.print_progress(progress.format(step, scalars))
                first_metrics = first_metrics or scalars
                last_metrics = scalars
                window_start, window_steps = time.time(), 0

            if preview is not None and (step % config.image_every_steps == 0 or step == config.total_steps):
                rec = reconstruct(state.params, frozen["model_rest"], preview)
                writer.write_image_grid(
                    step,
                    "reconstruction",
                    multihost_utils.process_allgather(preview, tiled=True),
                    multihost_utils.process_allgather(rec, tiled=True),
                )

            with timers("eval"):
                if evals_due(config, step):  # collective: every host runs them
                    watchdog.long_phase(f"periodic evals at step {step}")
                    run_periodic_evals(
                        config, step, state.params, frozen["model_rest"], components.ctx.model_graphdef, writer
                    )

            preempted = stop.requested or _preemption_reached(step)
            if checkpoint_due or step % config.ckpt_every_steps == 0 or step == config.total_steps or preempted:
                # Never checkpoint inside a non-finite streak: the newest checkpoint stays the last good state.
                streak = int(metrics["train/consecutive_nonfinite"])
                if streak >= max_nonfinite:
                    error = _nonfinite_error(streak, step, max_nonfinite, checkpointer)
                    _console(f"stopping: {error}")
                    raise error
                checkpoint_due = streak > 0
                if checkpoint_due:
                    logging.warning(
                        "step %d: not checkpointing during a run of %d non-finite step(s); will checkpoint "
                        "after the next finite step",
                        step,
                        streak,
                    )
                else:
                    with timers("checkpoint"):
                        checkpointer.save(
                            step,
                            state,
                            data_iter,
                            _config_json(config),
                            force=preempted,
                            data_position=_data_position(data_iter, config),
                        )
            if preempted:
                watchdog.long_phase(f"the preemption checkpoint of step {step}")
                with timers("checkpoint"):
                    checkpointer.wait()
                last = checkpointer.latest_step()
                _console(
                    f"preempted at step {step}: {'checkpoint written' if last == step else f'newest checkpoint is step {last}'}"
                    f"; exiting cleanly (rerun the same command to resume)"
                )
                break
        if checkpoint_due:
            _console(
                f"warning: the run ended inside a run of non-finite steps, so step {step} was not checkpointed; "
                f"the newest checkpoint is step {checkpointer.latest_step()}"
            )
        watchdog.long_phase("the final checkpoint save")
        checkpointer.close()  # waits for the last async save: a failure there is a CheckpointSaveError
    except checkpointing.CheckpointSaveError as e:
        _console(f"stopping at step {step}: {e}")
        raise
    finally:
        watchdog.stop()
        stop.uninstall()
        _close_quietly(checkpointer)
        if writer is not None:
            writer.flush()
            writer.close()
    return {
        "start_step": start_step,
        "final_step": step,
        "origin": origin,
        "first": first_metrics,
        "last": last_metrics,
        "timers": timers.as_metrics(),
        "writer_errors": writer.errors if writer is not None else 0,
    }


def _close_quietly(checkpointer) -> None:
    """Close after an error without masking it (a failed async save would raise again here)."""
    try:
        checkpointer.manager.close()
    except Exception as e:  # noqa: BLE001
        logging.warning("closing the checkpoint manager: %s: %s", type(e).__name__, e)


def _check_workdir(workdir: str, checkpoint_dir: str) -> None:
    """The workdir and its checkpoints directory must be writable: checked in seconds, before any compile."""
    for where in (workdir, checkpoint_dir):
        if paths.exists(where) and not paths.isdir(where):
            raise WorkdirError(f"--workdir: {where} exists and is not a directory")
        try:
            paths.check_writable(where)
        except OSError as e:
            raise WorkdirError(
                f"--workdir: {e}. Point --workdir at a writable directory (local, NFS or gs://) "
                "or fix its permissions/mount; nothing has been trained or written."
            ) from e


def _warn_if_low_space(checkpoint_dir: str, components: Components, keep: int) -> None:
    free = paths.free_bytes(checkpoint_dir)
    if free is None:  # object store
        return
    state_bytes = sum(
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(components.abstract_state)
    )
    need = (keep + 1) * state_bytes  # keep_checkpoints plus the one being written
    if free < need:
        logging.warning(
            "low disk space: %.2f GiB free in %s, but %d checkpoints of %.2f GiB need %.2f GiB; "
            "a save will fail when the disk fills (the run then stops naming the last good step)",
            free / 2**30,
            checkpoint_dir,
            keep + 1,
            state_bytes / 2**30,
            need / 2**30,
        )
        _console(
            f"warning: only {free / 2**30:.2f} GiB free for checkpoints in {checkpoint_dir} "
            f"(need about {need / 2**30:.2f} GiB)"
        )


def _model_batch(local: dict, mesh) -> dict:
    """The per-process numpy batch as global arrays, with only the keys the step reads."""
    return shd.to_global_batch({k: v for k, v in local.items() if k in ("image", "text", "label")}, mesh)


def _data_position(data_iter, config) -> dict | None:
    """The topology-free data position (collective: every process calls it at the same step). None with Grain
    worker processes, whose state is per worker: such a run resumes only on the same process count."""
    from unitok_jax.data import pipeline

    try:
        local = pipeline.local_next_index(data_iter)
    except ValueError:
        return None
    if jax.process_count() > 1:
        everyone = [int(n) for n in np.ravel(multihost_utils.process_allgather(np.asarray(local, np.int64)))]
    else:
        everyone = [local]
    return pipeline.global_position(everyone, int(config.global_batch_size))


def _startup_timeout_s(config) -> float:
    return float((config.get("watchdog", None) or {}).get("startup_timeout_s", 3600.0))


def _wait_for_every_host(name: str, timeout_s: float) -> None:
    """A barrier on the jax.distributed coordination service (not a device collective, so no collective timeout)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client JAX itself (and Orbax) use for barriers; no public wrapper yet

    client = distributed.global_state.client
    if client is None:  # several processes without jax.distributed: nothing to wait on
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


def _make_watchdog(config) -> watchdog_lib.Watchdog:
    """The hang watchdog; with `watchdog.enabled=False` it is never started (its methods are then no-ops)."""
    cfg = config.get("watchdog", None) or {}
    dog = watchdog_lib.Watchdog(
        factor=float(cfg.get("factor", 20.0)),
        min_timeout_s=float(cfg.get("min_timeout_s", 600.0)),
        startup_timeout_s=_startup_timeout_s(config),
    )
    return dog.start() if cfg.get("enabled", True) else dog


def _step_variants(components: Components, start_step: int, total_steps: int) -> list[bool]:
    """The GAN on/off variants this invocation will run (both when it crosses loss.gan_start)."""
    if components.ctx.disc_graphdef is None:
        return [False]
    gan_start = components.ctx.gan_start_step
    return sorted({start_step >= gan_start, total_steps - 1 >= gan_start})  # gan_active is monotone in the step


def compile_train_steps(components: Components, config, state, frozen, batch, start_step: int) -> dict[bool, Any]:
    """Compiles every step variant the run will use now (logged), checks its memory against the device's, and returns
    the compiled executables keyed by gan_active. Raises StepMemoryError naming the config levers when a step
    cannot fit."""
    jitted = jit_train_steps(components, jax.tree.map(lambda x: x.sharding, batch))
    compiled = {}
    for gan_active in _step_variants(components, start_step, int(config.total_steps)):
        name = "GAN step" if gan_active else "step without GAN"
        _console(f"compiling the {name} (cached programs load in seconds; a first compile can take minutes on a CPU)")
        t0 = time.time()
        compiled[gan_active] = jitted[gan_active].lower(state, frozen, batch).compile()
        seconds = time.time() - t0
        need, limit = _step_memory(compiled[gan_active])
        if config.get("device_memory_limit_gib"):  # plan for a smaller budget (headroom, another chip) or on CPU
            limit = int(float(config.device_memory_limit_gib) * 2**30)
        fits = f" of {limit / 2**30:.2f} GiB" if limit else ""
        _console(
            f"compiled the {name} in {seconds:.1f} s"
            + (f": {need / 2**30:.2f} GiB/device{fits}" if need is not None else "")
        )
        if need is not None and limit and need > limit:
            raise StepMemoryError(
                f"the {name} needs {need / 2**30:.2f} GiB per device but the device has {limit / 2**30:.2f} GiB. "
                f"Levers: --config.grad_accum_steps (now {components.grad_accum_steps}; more micro-batches = less "
                f"activation memory), --config.model.remat=full, a smaller --config.global_batch_size, or more "
                f"devices / a wider --config.mesh.fsdp (params and AdamW state are sharded over it)."
            )
    return compiled


def _step_memory(compiled) -> tuple[int | None, int | None]:
    """(bytes the step needs per device, bytes the device has); either may be unknown (None)."""
    need = limit = None
    try:
        m = compiled.memory_analysis()
        need = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 — not every backend reports it
        pass
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        limit = int(stats["bytes_limit"]) if "bytes_limit" in stats else None
    except Exception:  # noqa: BLE001 — CPU has no memory stats
        pass
    return need, limit


def _config_json(config: ml_collections.ConfigDict) -> dict:
    import json

    return json.loads(config.to_json_best_effort())


def _restore_or_init(config, components: Components, checkpointer, abstract, data_iter):
    """workdir checkpoint → resume_from → init_from → scratch. Damaged newest checkpoints fall back to older ones
    with a warning; checkpoints that exist but all fail raise `checkpointing.RestoreError` (never a silent scratch)."""
    damaged = []
    step, state = checkpointer.restore_latest_good(abstract, data_iter, on_damaged=lambda s, e: damaged.append(s))
    note = f" (skipped damaged checkpoint(s) {damaged}, moved to {checkpointer.damaged_directory})" if damaged else ""
    if state is not None:
        return state, int(step), f"resumed from {checkpointer.directory} at step {step}{note}"
    if config.resume_from:
        other = checkpointing.Checkpointer(config.resume_from, async_save=False, read_only=True)
        try:
            step, state = other.restore_latest_good(abstract, data_iter)
        finally:
            other.close()
        if state is None:
            raise checkpointing.RestoreError(f"config.resume_from={config.resume_from!r} holds no readable checkpoint")
        return state, int(step), f"resumed from {config.resume_from} at step {step}"
    _console("initialising the model (born sharded; its program compiles on a first run)")
    with jax.set_mesh(components.mesh):
        state = components.init_state()
    if config.init_from:
        # Read straight into this run's shardings (another run's mesh/process count is fine).
        state = state.replace(params=checkpointing.restore_params_only(config.init_from, abstract.params))
        return state, 0, f"initialised params from {config.init_from}"
    if config.get("semantic_init_path"):
        state = _load_pretrained_semantic_encoder(config, components, state)
        return state, 0, f"started from scratch with the semantic encoder from {config.semantic_init_path}"
    return state, 0, "started from scratch"


def _load_pretrained_semantic_encoder(config, components: Components, state):
    """TokenFlow: the student semantic tower starts from pretrained CLIP / SigLIP / ViTamin weights (as the official
    code does); every other parameter keeps its fresh init."""
    from unitok_jax.convert.tokenflow import load_semantic_encoder

    loaded = dict(nnx.to_flat_state(load_semantic_encoder(config.semantic_init_path, _model_dict(config))))
    flat = list(nnx.to_flat_state(state.params))
    shardings = dict(nnx.to_flat_state(components.state_shardings.params))
    ours = {path[1:] for path, _ in flat if path[0] == "encoder_vqkd"}
    if ours != set(loaded):
        raise ValueError(
            f"semantic_init_path: pretrained tower params {sorted(set(loaded) ^ ours)[:5]} do not match "
            "the model's encoder_vqkd"
        )
    for path, var in flat:
        if path[0] == "encoder_vqkd":
            new = loaded[path[1:]].get_value()
            if tuple(new.shape) != tuple(var.get_value().shape):
                raise ValueError(
                    f"semantic_init_path: {'/'.join(map(str, path))} has shape {tuple(new.shape)}, "
                    f"the model expects {tuple(var.get_value().shape)}"
                )
            sharding = shardings[path]
            var.set_value(jax.device_put(jnp.asarray(new, var.get_value().dtype), getattr(sharding, "value", sharding)))
    return state.replace(params=nnx.from_flat_state(flat))


def _reconstruct(params, model_rest, images, *, graphdef):
    model = nnx.merge(graphdef, params, model_rest)
    rec, _ = model(images, deterministic=True)
    return jnp.clip(rec.astype(jnp.float32), -1.0, 1.0)


def _preview_batch(config, mesh):
    """A fixed batch of eval images (same every time) for the reconstruction grids."""
    from unitok_jax.data import pipeline

    try:
        loader = pipeline.make_eval_loader(config.data, batch_size=max(8, jax.device_count()))
        batch = next(iter(loader))
    except Exception as e:  # no eval split configured: grids are skipped, training is unaffected
        logging.warning("no eval data for reconstruction grids (%s)", e)
        return None
    n = (min(8, batch["image"].shape[0]) // jax.device_count()) * jax.device_count() or jax.device_count()
    images = np.asarray(batch["image"][:n], np.float32)
    if images.shape[0] < n:
        return None
    per_process = n // jax.process_count()
    start = jax.process_index() * per_process
    return shd.to_global_batch({"image": images[start : start + per_process]}, mesh)["image"]

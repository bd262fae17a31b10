"""Training entry point.

    python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=runs/tiny [--config.total_steps=200 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. Multi-process runs (TPU pods,
SLURM, several GPU hosts, or a local CPU rehearsal) call jax.distributed.initialize first; see launch/.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unitok_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/unitok.py:tiny", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images (resumed if it exists).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "Persistent XLA compilation cache: 'auto' ($JAX_COMPILATION_CACHE_DIR if set, else "
    "$UNITOK_JAX_CACHE/xla or ~/.cache/unitok_jax/xla for single-process runs), 'none', or a directory.",
)
distributed.define_flags(flags)
flags.mark_flags_as_required(["config", "workdir"])


def compilation_cache_dir(flag: str, environ, process_count: int) -> str | None:
    """Where compiled programs persist, so a rerun or a resumed run skips the minutes of compilation.

    'auto' is off for multi-process runs unless the launcher exported JAX_COMPILATION_CACHE_DIR (launch/ puts it in
    the workdir): on multi-process CPU only process 0 writes entries, the others then compile while it waits, and
    gloo's 30 s rendezvous deadline fails (launch/local_cpu_rehearsal.sh).
    """
    if flag == "none":
        return None
    if flag != "auto":
        return flag
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    if process_count > 1:
        return None
    root = environ.get("UNITOK_JAX_CACHE") or "~/.cache/unitok_jax"
    return f"{root.rstrip('/')}/xla"


def _configure_compilation_cache() -> None:
    import os

    import jax

    from unitok_jax import paths

    directory = compilation_cache_dir(_COMPILATION_CACHE.value, os.environ, jax.process_count())
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    directory = paths.resolve(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    logging.info("persistent compilation cache: %s", directory)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax/Grain log every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_flags(flags.FLAGS)
    _configure_compilation_cache()
    from unitok_jax.train import trainer

    from unitok_jax import config_lib
    from unitok_jax.train import checkpointing

    # Errors that say what to do: one clear line and a non-zero exit, not a traceback (details stay in the log).
    expected = (
        trainer.WorkdirError,
        trainer.StepMemoryError,
        trainer.NonFiniteError,
        checkpointing.RestoreError,
        checkpointing.CheckpointSaveError,
        config_lib.ConfigError,
    )
    try:
        summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    except expected as e:
        logging.info("stopped", exc_info=True)
        print(f"[unitok_jax] error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODES.get(type(e).__name__, 1))
    logging.info("finished: %s", {k: v for k, v in summary.items() if k not in ("first", "last")})


# Non-zero exit codes of a run that stopped with a known error. launch/supervise.sh restarts on any non-zero
# code except the ones listed in its NO_RESTART_CODES (a config or memory error would only fail again).
EXIT_CODES = {
    "ConfigError": 2,
    "StepMemoryError": 3,
    "WorkdirError": 4,
    "RestoreError": 5,
    "CheckpointSaveError": 6,
    "NonFiniteError": 7,
}


if __name__ == "__main__":
    app.run(main)

"""Training entry point.

    python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=runs/tiny [--config.total_steps=200 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. Multi-process runs (TPU pods,
SLURM, several GPU hosts, or a local CPU rehearsal) call jax.distributed.initialize first; see launch/.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/unitok.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images (resumed if it exists).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize. Default: auto (on when launched by SLURM/TPU pod env or --num_processes > 1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process CPU/GPU without a cluster env).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Devices this process uses (multi-GPU hosts).")
flags.mark_flags_as_required(["config", "workdir"])


def _should_initialize_distributed() -> bool:
    if _DISTRIBUTED.value is not None:
        return _DISTRIBUTED.value
    if (_NUM_PROCESSES.value or 1) > 1:
        return True
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_multi or tpu_pod


def initialize_distributed() -> None:
    import jax

    if _should_initialize_distributed():
        kwargs = {}
        if _COORDINATOR.value:
            kwargs["coordinator_address"] = _COORDINATOR.value
        if _NUM_PROCESSES.value is not None:
            kwargs["num_processes"] = _NUM_PROCESSES.value
        if _PROCESS_ID.value is not None:
            kwargs["process_id"] = _PROCESS_ID.value
        if _LOCAL_DEVICE_IDS.value:
            kwargs["local_device_ids"] = [int(i) for i in _LOCAL_DEVICE_IDS.value]
        jax.distributed.initialize(**kwargs)
        logging.info("jax.distributed: process %d / %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax/Grain log every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    from unitok_jax.train import trainer

    summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    logging.info("finished: %s", {k: v for k, v in summary.items() if k not in ("first", "last")})


if __name__ == "__main__":
    app.run(main)

"""`jax.distributed.initialize` for every entry point (train, evaluate, export_codes), with one rule for when."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from absl import logging


def should_initialize(flag: bool | None, num_processes: int | None, environ: Mapping[str, str], tpu_chips: int) -> bool:
    """Whether to call jax.distributed.initialize: --distributed if given; else on any Cloud TPU VM (JAX reads the
    coordinator, process count and id from the TPU metadata; on a pod slice the hosts are often NOT listed in the
    shell's environment, so testing TPU_WORKER_HOSTNAMES would start N independent single-host jobs), under SLURM
    with several tasks, or with --num_processes > 1."""
    if flag is not None:
        return flag
    if (num_processes or 1) > 1:
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return tpu_chips > 0 or "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def tpu_chips() -> int:
    """TPU chips on this host, read from the PCI bus without starting any JAX backend (0 elsewhere)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 — a private helper: if it moves, fall back to the environment checks
        return 0


def initialize(
    flag: bool | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | None = None,
) -> bool:
    """Call jax.distributed.initialize when `should_initialize` says so (arguments left None come from the cluster
    environment); returns whether it did."""
    if not should_initialize(flag, num_processes, os.environ, tpu_chips()):
        return False
    import jax

    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    if local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d / %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def define_flags(flags) -> None:
    """The multi-process flags every CLI shares (absl `flags` module passed in)."""
    flags.DEFINE_bool(
        "distributed",
        None,
        "Call jax.distributed.initialize. Default: auto (on Cloud TPU VMs, SLURM with several tasks, --num_processes > 1).",
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a cluster env).")
    flags.DEFINE_integer("num_processes", None, "Total number of processes.")
    flags.DEFINE_integer("process_id", None, "Index of this process.")
    flags.DEFINE_list("local_device_ids", None, "Devices this process uses (multi-GPU hosts).")


def initialize_from_flags(FLAGS) -> bool:
    """`initialize` with the values of `define_flags`' flags."""
    return initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        local_device_ids=FLAGS.local_device_ids,
    )

"""Micro config for the multi-process tests (`python -m unitok_jax.main` launched N times on one machine).

    python -m unitok_jax.main --config=tests/multiprocess_config.py --workdir=/tmp/run \
        --config.data.data_dir=/tmp/data --coordinator_address=localhost:12345 --num_processes=2 --process_id=0

Values are those of `tests/train_helpers.micro_config` without the GAN (DiffAug draws per-row random
augmentations, and a multi-process global batch holds the same examples in a different row order, so with the GAN
on the runs would differ by more than summation order). The mesh is FSDP over all devices (data=2, fsdp=-1), so
the test exercises sharded params, the cross-host contrastive all-gather and multi-host Orbax saves.
"""

from __future__ import annotations

import pathlib
import sys

_TESTS = pathlib.Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_helpers import micro_config  # noqa: E402

TOTAL_STEPS = 4


def get_config(arg: str | None = None):
    del arg
    c = micro_config(pathlib.Path("/tmp/unitok_jax_multiprocess"), gan=False, batch=8, steps=TOTAL_STEPS)
    c.mesh.update(dict(data=2, fsdp=-1, tensor=1, rules="fsdp"))
    c.ckpt_every_steps = 2
    c.log_every_steps = 1
    c.image_every_steps = 1000  # one grid at the end (exercises the cross-host allgather of the preview)
    c.eval.every_steps = 0  # no periodic evals (they would add compiles and records to metrics.jsonl)
    c.async_checkpointing = True  # the production default
    # Constant learning rate: a run stopped at step 2 (total_steps=2) and resumed to 4 then follows exactly the
    # schedule of an uninterrupted 4-step run (with warm-up + cosine the schedule depends on total_steps).
    c.optimizer.warmup = 0.0
    c.optimizer.end_lr_ratio = 1.0
    c.data.read_threads = 1
    c.data.prefetch = 16
    return c

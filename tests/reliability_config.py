"""Micro-sized training config for the reliability tests that drive `python -m unitok_jax.main` as a subprocess.

    python -m unitok_jax.main --config=tests/reliability_config.py:gan --workdir=/tmp/run \
        --config.data.data_dir=/tmp/data

`arg`: 'gan' (discriminator on from step 0, the default) or 'nogan'. The values are those of
`tests/train_helpers.micro_config` (a few-second compile); the data dir should be set with
`--config.data.data_dir` (the embedded dataset is generated there on first use).
"""

from __future__ import annotations

import pathlib
import sys

_TESTS = pathlib.Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_helpers import micro_config  # noqa: E402

TOTAL_STEPS = 16  # every run uses this value: the lr schedule is baked into the step, so the compile cache hits


def get_config(arg: str | None = None):
    gan = (arg or "gan") == "gan"
    if arg not in (None, "gan", "nogan"):
        raise ValueError(f"unknown variant {arg!r}; use 'gan' or 'nogan'")
    c = micro_config(pathlib.Path("/tmp/unitok_jax_reliability"), gan=gan, batch=8, steps=TOTAL_STEPS)
    c.async_checkpointing = True  # the production default: kills can land in the middle of a background save
    c.ckpt_every_steps = 2
    c.keep_checkpoints = 3
    c.log_every_steps = 1
    c.image_every_steps = 1000  # one grid at the end only (a second compiled function)
    c.data.read_threads = 1
    c.data.prefetch = 16
    return c


# ------------------------------------------------------------------------------------------------------------------
# Helpers for the tests that drive this config in subprocesses (tests/test_reliability_*.py).

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

CONFIG_PATH = str(pathlib.Path(__file__).resolve())
REPO = str(_TESTS.parent)
MAIN = ["-m", "unitok_jax.main"]


def subprocess_env() -> dict:
    """One CPU device (faster to compile than the 8 fake ones of conftest) and a persistent compilation cache
    shared by all runs (a restart then skips the ~1-3 min compile, as a production restart would)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    cache = env.get("UNITOK_TEST_COMPILE_CACHE") or os.path.join(
        tempfile.gettempdir(), f"unitok_jax_test_jax_cache_{os.getuid()}"
    )
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_args(workdir, data_dir, *overrides: str, variant: str = "gan") -> list[str]:
    return [
        f"--config={CONFIG_PATH}:{variant}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.total_steps={TOTAL_STEPS}",
        *overrides,
    ]


# `python -c DRIVER <main's flags>`: `python -m unitok_jax.main` with test-only patches chosen by env variables.
DRIVER = """
# `python -m unitok_jax.main` with test-only patches chosen by environment variables.
import os
import numpy as np
from jax.experimental import multihost_utils
from unitok_jax.data import pipeline

POISON_AFTER = int(os.environ.get("RELIABILITY_POISON_AFTER", "-1"))
PREEMPT_AT = int(os.environ.get("RELIABILITY_PREEMPT_AT", "-1"))
SLOW_COMMIT_S = float(os.environ.get("RELIABILITY_SLOW_COMMIT_S", "0"))

if POISON_AFTER >= 0:
    _make = pipeline.make_train_loader

    def make_train_loader(*args, **kwargs):
        count = [0]

        def poison(batch):  # batches are consumed one per step, from step 1 (the run starts from scratch)
            count[0] += 1
            if count[0] > POISON_AFTER:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            return batch

        return _make(*args, **kwargs).map(poison)

    pipeline.make_train_loader = make_train_loader

if PREEMPT_AT >= 0:  # what JAX's preemption service answers on every host once a notice arrived
    multihost_utils.reached_preemption_sync_point = lambda step: step == PREEMPT_AT

if SLOW_COMMIT_S > 0:  # keep each async save's '<step>.orbax-checkpoint-tmp' dir alive a while before its rename
    import asyncio
    from orbax.checkpoint._src.path import atomicity

    _finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        await asyncio.sleep(SLOW_COMMIT_S)
        return await _finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize

from absl import app
from unitok_jax import main
app.run(main.main)
"""


class Run:
    """A training subprocess whose stdout/stderr go to files (so pipes never block it)."""

    def __init__(self, args: list[str], log_prefix, *, python_code: str | None = None, env: dict | None = None):
        import sys as _sys

        self.stdout_path, self.stderr_path = f"{log_prefix}.stdout", f"{log_prefix}.stderr"
        self._out, self._err = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        head = ["-c", python_code] if python_code else MAIN
        self.proc = subprocess.Popen(
            [_sys.executable, *head, *args],
            cwd=REPO,
            env={**subprocess_env(), **(env or {})},
            stdout=self._out,
            stderr=self._err,
        )
        self.started = time.time()

    def stdout(self) -> str:
        with open(self.stdout_path) as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()

    def last_step(self) -> int:
        """Newest step of the progress lines ('step 5/16 | ...')."""
        steps = re.findall(r"^step (\d+)/", self.stdout(), flags=re.M)
        return int(steps[-1]) if steps else 0

    def wait_for(self, predicate, timeout: float = 600, poll: float = 0.02) -> bool:
        """Polls `predicate()` until true (→ True) or the process exits / the timeout passes (→ False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return bool(predicate())
            time.sleep(poll)
        return False

    def finish(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def describe(self) -> str:
        return f"rc={self.proc.returncode}\n--- stdout ---\n{self.stdout()[-3000:]}\n--- stderr ---\n{self.stderr()[-5000:]}"


def committed_steps(workdir) -> list[int]:
    """Checkpoint steps whose Orbax commit marker exists (i.e. a restart can use them)."""
    root = os.path.join(str(workdir), "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(
        int(d) for d in os.listdir(root) if d.isdigit() and os.path.exists(os.path.join(root, d, "commit_success.txt"))
    )


def in_flight_saves(workdir) -> list[str]:
    root = os.path.join(str(workdir), "checkpoints")
    try:
        return [d for d in os.listdir(root) if ".orbax-checkpoint-tmp" in d]
    except FileNotFoundError:
        return []


def resumed_step(stdout: str) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", stdout)
    return int(m.group(1)) if m else None


def saved_state(workdir, step: int) -> dict:
    """The whole checkpointed TrainState of `step` as {path: numpy array} (params, optimizer, disc, rng, counters)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    restored = ocp.StandardCheckpointer().restore(path)
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def build_data(data_dir) -> None:
    """The embedded dataset of micro_config, generated once before the subprocesses start."""
    from unitok_jax.data import embedded

    c = get_config()
    e = c.data.embedded
    embedded.build_embedded_dataset(
        str(data_dir),
        num_train=int(e.num_train),
        num_eval=int(e.num_eval),
        image_size=int(e.image_size),
        seed=int(e.seed),
    )

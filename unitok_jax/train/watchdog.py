"""Hang watchdog: a step (or a collective inside it) that takes far longer than usual ends the process.

On a pod a host that died, a wedged collective or a stuck file system leaves every other host blocked inside a
step for as long as the coordination service's heartbeat timeout (or forever). The watchdog is a daemon thread
that the train loop pets once per step. When the time since the last pet exceeds
``max(min_timeout_s, factor × median of recent step times)`` it logs every thread's Python stack (so the log says
where it hung), and exits the process with ``EXIT_CODE``, so the supervisor (launch/supervise.sh) restarts the
job, which resumes from the newest checkpoint. The first steps (compilation) and phases the loop announces as long
(checkpoint waits, evals) use ``startup_timeout_s`` instead.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Callable

from absl import logging

EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — a hang is not a bug in the config


def thread_stacks() -> str:
    """Every live thread's current Python stack, as text."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():  # noqa: SLF001 — the documented way to read all stacks
        out.append(f"--- thread {names.get(ident, '?')} ({ident}) ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


class Watchdog:
    """Call ``pet()`` after every step; ``long_phase(seconds)`` before work known to be slow; ``stop()`` at the end."""

    def __init__(
        self,
        *,
        factor: float = 20.0,
        min_timeout_s: float = 600.0,
        startup_timeout_s: float = 3600.0,
        window: int = 50,
        poll_s: float = 1.0,
        on_hang: Callable[[str], None] | None = None,
    ):
        self.factor = float(factor)
        self.min_timeout_s = float(min_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.poll_s = float(poll_s)
        self._durations: collections.deque[float] = collections.deque(maxlen=int(window))
        self._last = time.monotonic()
        self._allowance: float | None = float(startup_timeout_s)  # until the first step time is known
        self._what = "start-up (restore, compilation, first step)"
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._on_hang = on_hang or _exit_on_hang
        self._thread = threading.Thread(target=self._run, name="unitok_jax-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def pet(self, what: str = "train step") -> None:
        """One unit of progress finished (a step); the next one gets the usual budget."""
        now = time.monotonic()
        with self._lock:
            if self._allowance is None:
                self._durations.append(now - self._last)
            self._last, self._allowance, self._what = now, None, what

    def long_phase(self, what: str, seconds: float | None = None) -> None:
        """The work starting now (an eval, a final checkpoint wait) may take up to ``seconds`` (default: start-up)."""
        with self._lock:
            self._last = time.monotonic()
            self._allowance = self.startup_timeout_s if seconds is None else float(seconds)
            self._what = what

    def timeout(self) -> float:
        with self._lock:
            if self._allowance is not None:
                return self._allowance
            if not self._durations:
                return self.min_timeout_s
            return max(self.min_timeout_s, self.factor * statistics.median(self._durations))

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            limit = self.timeout()
            with self._lock:
                waited, what = time.monotonic() - self._last, self._what
            if waited > limit:
                median = statistics.median(self._durations) if self._durations else float("nan")
                message = (
                    f"watchdog: no progress for {waited:.0f} s in {what} (limit {limit:.0f} s; median step "
                    f"{median:.2f} s). A host may have died or a collective is stuck. Stacks of every thread:\n"
                    f"{thread_stacks()}"
                )
                self._stopped.set()
                self._on_hang(message)
                return


def _exit_on_hang(message: str) -> None:
    logging.error("%s", message)
    print(
        f"[unitok_jax] {message.splitlines()[0]} Exiting with code {EXIT_CODE} so the supervisor restarts the run "
        "(it resumes from the newest checkpoint).",
        file=sys.stderr,
        flush=True,
    )
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)  # the main thread is blocked: sys.exit from here would not end the process

"""Performance accounting: wall-time buckets (compile, data wait, step, checkpoint, eval)."""

from __future__ import annotations

import contextlib
import time


class TimeBuckets:
    """Accumulates seconds per named bucket; `as_metrics()` gives `perf/time/<bucket>` totals."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"perf/time/{name}": seconds for name, seconds in sorted(self.totals.items())}

"""Where a training step's time goes, measured inside the worker with a monotonic clock.

Phases of one step: `data_s` (waiting for the next batch), `forward_backward_s` (local compute),
`aggregation_wait_s` (blocked on gradient communication: in `synchronize()`, plus the part of
backward that DDP spends waiting for its all-reduce, see `GradientAggregator.backward_wait_s`) and
`optimizer_s` (step, scaler, scheduler). Sums are kept per logging interval and reported with it.

On CUDA the clock reads host time: kernels are asynchronous, so a phase's figure is the host
time up to the point that blocks. The interval's total is exact (the log step reads the loss,
which synchronizes); the split between phases is approximate there, and no synchronization is
added to the hot loop to sharpen it.
"""

from __future__ import annotations

import time

PHASES = ("data_s", "forward_backward_s", "aggregation_wait_s", "optimizer_s")


class StepClock:
    """Laps of a monotonic clock added to named phases."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._mark = time.perf_counter()

    def restart(self) -> None:
        """Start the next lap now; the time since the last lap belongs to no phase."""
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._mark
        self._mark = now

    def shift(self, source: str, target: str, seconds: float) -> None:
        """Move `seconds` already counted in `source` to `target` (e.g. waiting inside backward)."""
        seconds = min(max(seconds, 0.0), self.totals[source])
        self.totals[source] -= seconds
        self.totals[target] += seconds

    def pop(self) -> dict[str, float]:
        """The interval's sums; the clock starts a new interval."""
        totals, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return totals

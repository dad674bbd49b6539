"""Where a training step's time goes, measured inside the worker with a monotonic clock.

Phases of one step: `data_s` (waiting for the next batch), `forward_backward_s` (local compute),
`aggregation_wait_s` (blocked on gradient communication: in `synchronize()`, plus the part of
backward that DDP spends waiting for its all-reduce, see `GradientAggregator.backward_wait_s`) and
`optimizer_s` (step, scaler, scheduler). Sums are kept per logging interval and reported with it.

On a CPU the clock is `time.perf_counter`. On CUDA host time says little (kernels are queued
ahead; NCCL marks a collective done when it is queued), so `EventClock` records a CUDA event on
the current stream at each lap and reads the elapsed GPU time between them only in `pop()`, at a
log step, after that step's loss has synchronized the device: no synchronization is added to the
step. There, backward's wait for DDP's all-reduce is the GPU time from the last bucket's launch
(an event the comm hook records, `SinceEvent`) to the end of backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distrain.device import timing_event

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


@dataclass
class SinceEvent:
    """A wait known only on the GPU: from `event` to the end of the lap it is shifted out of."""

    event: Any


class EventClock(StepClock):
    """`StepClock` in GPU time: CUDA events recorded per lap, read at `pop()` (a log step).

    Events are recycled between intervals, so a step creates none after the first interval.
    """

    def __init__(self, make_event: Callable[[], Any]) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._make_event = make_event
        self._free: list[Any] = []
        self._used: list[Any] = []
        self._laps: list[tuple[str, Any, Any]] = []
        self._shifts: list[tuple[str, str, Any, float | SinceEvent]] = []
        self._mark = self._record()

    def _record(self) -> Any:
        event = self._free.pop() if self._free else self._make_event()
        event.record()
        self._used.append(event)
        return event

    def restart(self) -> None:
        self._mark = self._record()

    def lap(self, phase: str) -> None:
        now = self._record()
        self._laps.append((phase, self._mark, now))
        self._mark = now

    def shift(self, source: str, target: str, seconds: float | SinceEvent) -> None:
        """As StepClock.shift; a SinceEvent is resolved against the last `source` lap's end."""
        end = next((lap[2] for lap in reversed(self._laps) if lap[0] == source), None)
        self._shifts.append((source, target, end, seconds))

    def pop(self) -> dict[str, float]:
        if self._laps:
            self._laps[-1][2].synchronize()  # already done after the log step's .item()
        totals = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self._laps:
            totals[phase] += start.elapsed_time(end) / 1e3  # ms -> s
        for source, target, end, amount in self._shifts:
            if isinstance(amount, SinceEvent):
                amount = amount.event.elapsed_time(end) / 1e3 if end is not None else 0.0
            amount = min(max(amount, 0.0), totals[source])
            totals[source] -= amount
            totals[target] += amount
        # The current mark stays in use: the next lap starts from it.
        self._free.extend(e for e in self._used if e is not self._mark)
        self._used, self._laps, self._shifts = [self._mark], [], []
        return totals


def make_clock(device: torch.device) -> StepClock:
    """The step clock for a worker on `device`: GPU time on CUDA, host time elsewhere."""
    if timing_event(device) is None:
        return StepClock()
    return EventClock(lambda: timing_event(device))

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

On a CPU the clock also counts `cpu_wait_s`: how long the training thread, during the busy phases,
was ready to run but waited for a core that another thread or process held (Linux's run-queue
delay, /proc/<pid>/task/<tid>/schedstat). It tells a worker starved of CPU on a crowded node from
one that is slow at its own work (distrain/stragglers.py). Read with `pread` on a kept file
descriptor: about a microsecond per lap.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distrain.device import timing_event

PHASES = ("data_s", "forward_backward_s", "aggregation_wait_s", "optimizer_s")
# What a worker spends of a step on its own (not waiting for the others): comparing it across
# workers shows a straggler, since in synchronous training every worker's wall time is the same.
BUSY_PHASES = ("data_s", "forward_backward_s", "optimizer_s")


class RunQueueWait:
    """The calling thread's total time runnable but not running, in seconds (Linux only)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._last_s = 0.0
        weakref.finalize(self, os.close, fd)

    @classmethod
    def of_this_thread(cls) -> RunQueueWait | None:
        path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        try:  # fields: time on a CPU, time waiting on a run queue (both ns), time slices
            return cls(os.open(path, os.O_RDONLY))
        except OSError:  # not Linux, or a kernel without scheduler statistics
            return None

    def read_s(self) -> float:
        with contextlib.suppress(OSError):  # its thread ended (a hook's): nothing more to count
            self._last_s = int(os.pread(self._fd, 64, 0).split()[1]) / 1e9
        return self._last_s


class StepClock:
    """Laps of a monotonic clock added to named phases; the busy phases' run-queue wait beside."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._queue = RunQueueWait.of_this_thread()
        self._cpu_wait_s = 0.0
        self._mark = time.perf_counter()
        self._queued_s = self._queue.read_s() if self._queue else 0.0

    def restart(self) -> None:
        """Start the next lap now; the time since the last lap belongs to no phase."""
        self._mark = time.perf_counter()
        self._queued_s = self._queue.read_s() if self._queue else 0.0

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._mark
        self._mark = now
        if self._queue is not None:
            queued_s = self._queue.read_s()
            if phase in BUSY_PHASES:
                self._cpu_wait_s += queued_s - self._queued_s
            self._queued_s = queued_s

    def shift(self, source: str, target: str, seconds: float, *, cpu_wait_s: float = 0.0) -> None:
        """Move `seconds` already counted in `source` to `target` (e.g. waiting inside backward),
        and `cpu_wait_s` of run-queue wait within them out of the busy phases' count."""
        seconds = min(max(seconds, 0.0), self.totals[source])
        self.totals[source] -= seconds
        self.totals[target] += seconds
        if source in BUSY_PHASES and target not in BUSY_PHASES:
            self._cpu_wait_s -= min(max(cpu_wait_s, 0.0), seconds, self._cpu_wait_s)

    def pop(self) -> dict[str, float]:
        """The interval's sums; the clock starts a new interval."""
        totals, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return totals

    def pop_cpu_wait(self) -> float | None:
        """The interval's run-queue wait in the busy phases (seconds); None where unknown."""
        if self._queue is None:
            return None
        cpu_wait_s, self._cpu_wait_s = self._cpu_wait_s, 0.0
        return cpu_wait_s


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
        self._queue = None  # GPU time is compared across workers; host run-queue waits are not

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

    def shift(
        self, source: str, target: str, seconds: float | SinceEvent, *, cpu_wait_s: float = 0.0
    ) -> None:
        """As StepClock.shift; a SinceEvent is resolved against the last `source` lap's end.
        `cpu_wait_s` is ignored: GPU time has no run queue."""
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

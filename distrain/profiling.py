"""Profiling a few training steps on every rank (`logger.profile_steps=N`).

torch.profiler records the N steps after the first `logger.profile_after_step` of a worker's
run (the first steps allocate, compile and warm caches: not what a user tunes): CPU operators
on every device, and CUDA kernels with their launches on a GPU. Each rank's trace goes to the
driver, which writes it into the run directory as
`profile/rank<r>-steps<first>-<last>.pt.trace.json.gz`, Chrome's trace format that Perfetto
(https://ui.perfetto.dev) and chrome://tracing open. The driver writes it, as it writes
checkpoints, so a cluster needs no shared filesystem.

The recording, the schedule and the export are torch's own; this module only sets them up,
compresses the trace and ships it. Nothing here runs unless profiling was asked for.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from distrain.records import ProfileRecord, Record


class NoProfiler:
    """Profiling off: a step costs one empty call."""

    def step(self, step: int) -> None:
        pass


@contextlib.contextmanager
def profiled_steps(
    steps: int, after_step: int, device: torch.device, send: Callable[[Record], None]
) -> Iterator[StepProfiler | NoProfiler]:
    """What the training loop steps along (`steps=0`: nothing); closed, it sends what it has."""
    if not steps:
        yield NoProfiler()
        return
    profiler = StepProfiler(steps, after_step, device, send)
    try:
        yield profiler
    finally:
        profiler.close()


class StepProfiler:
    """Steps a torch profiler along with training; its trace is sent once recorded."""

    def __init__(
        self, steps: int, after_step: int, device: torch.device, send: Callable[[Record], None]
    ) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        else:
            # Kineto's start/stop notices, and on a CUDA build without a GPU a failed device
            # count, go to stderr: nothing a CPU run's user can act on.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self.steps, self.after_step, self.send = steps, after_step, send
        self.stepped = 0  # training steps since the start
        self.recorded: list[int] = []  # the training steps in the window
        self.profile = profile(
            activities=activities,
            # One step of warm-up lets the profiler start before the steps it records.
            schedule=schedule(
                wait=max(after_step - 1, 0), warmup=min(after_step, 1), active=steps, repeat=1
            ),
            on_trace_ready=self._send,
        )
        self.profile.start()
        self.open = True

    def step(self, step: int) -> None:
        """Training step `step` is done. Past the window the profiler is stopped: then a step
        costs a comparison."""
        if not self.open:
            return
        if self.after_step <= self.stepped < self.after_step + self.steps:
            self.recorded.append(step)
        self.stepped += 1
        self.profile.step()  # the window's last step: its trace is sent from here
        if self.stepped > self.after_step + self.steps:
            self.close()

    def close(self) -> None:
        """Training ended (or stopped): a window still recording is sent as far as it got."""
        if self.open:
            self.open = False
            self.profile.stop()

    def _send(self, profile: torch.profiler.profile) -> None:
        recorded = self.recorded
        if not recorded:
            return
        with tempfile.TemporaryDirectory(prefix="distrain-profile-") as tmp:
            path = Path(tmp) / "trace.json"
            profile.export_chrome_trace(str(path))
            trace_gz = gzip.compress(path.read_bytes(), compresslevel=6)
        self.send(ProfileRecord(first_step=recorded[0], last_step=recorded[-1], trace_gz=trace_gz))

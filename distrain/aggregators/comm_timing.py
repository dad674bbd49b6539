"""How long backward waits for DDP's all-reduce: a timing wrapper around a communication hook.

DDP launches each gradient bucket's all-reduce from inside backward, as soon as the bucket's
gradients are computed, and backward returns only when every bucket's future has completed. So
the time backward spends *blocked on communication* is

    wait = max(0, last bucket's completion − last bucket's launch)

where the last launch is when local backward compute ended (DDP launches the final bucket once
its last gradient is ready). Communication that overlapped compute is not counted: it cost
nothing. The wrapper composes with any hook (plain all-reduce, fp16/bf16, PowerSGD, or another
wrapper), since it only stamps the clock around whatever hook it is given.

On CUDA the host clock cannot see the wait (NCCL completes a bucket's future when the all-reduce
is queued), so with `make_event` set each launch records a CUDA event instead, and the wait is
the GPU time from the last launch to the end of backward, resolved by `timing.EventClock`.

On a CPU the training thread's run-queue wait (timing.RunQueueWait) is stamped beside each launch
and completion, so the part of that wait spent ready to run but without a core (a shared-memory
all-reduce yields its core to peers while it waits) leaves the busy time's `cpu_wait_s` with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from distrain.timing import RunQueueWait, SinceEvent

Hook = Callable[[Any, Any], torch.futures.Future]


class CommTimer:
    def __init__(self) -> None:
        # Lists, not running maxima: completions are stamped on the backend's threads, and
        # list.append is atomic under the GIL.
        self._launched_s: list[float] = []
        self._completed_s: list[float] = []
        self.make_event: Callable[[], Any] | None = None  # set on CUDA: time on the GPU
        self._last_launch: Any = None
        # The backward thread's run-queue wait, opened at its first launch (in that thread):
        # stamped beside each launch and completion.
        self._queue: RunQueueWait | None = None
        self._queue_opened = False
        self._launched_queue_s: list[float] = []
        self._completed_queue_s: list[float] = []
        self.last_cpu_wait_s = 0.0  # of the last popped wait, run-queue wait (seconds)

    def wrap(self, hook: Hook) -> Hook:
        # No annotations: DDP checks a hook's annotations against the real types, and this
        # module's are strings (postponed evaluation).
        def timed_hook(state, bucket):  # type: ignore[no-untyped-def]
            if self.make_event is not None:
                # On the current stream: done when the bucket's gradients are.
                self._last_launch = self.make_event()
                self._last_launch.record()
                return hook(state, bucket)
            if not self._queue_opened:
                self._queue, self._queue_opened = RunQueueWait.of_this_thread(), True
            self._launched_s.append(time.perf_counter())
            self._launched_queue_s.append(self._queue.read_s() if self._queue else 0.0)
            # `then` (not add_done_callback): DDP waits on the returned future, so the stamp is
            # taken before backward can return.
            return hook(state, bucket).then(self._completed)

        return timed_hook

    def _completed(self, future: torch.futures.Future) -> Any:
        # The queue file is the backward thread's, whichever thread runs this callback.
        self._completed_queue_s.append(self._queue.read_s() if self._queue else 0.0)
        self._completed_s.append(time.perf_counter())
        return future.value()

    def pop_wait_s(self) -> float | SinceEvent:
        """Seconds the last backward waited for communication; resets for the next one."""
        if self.make_event is not None:
            last, self._last_launch = self._last_launch, None
            return 0.0 if last is None else SinceEvent(last)
        launched, completed = self._launched_s, self._completed_s
        launched_queue_s, completed_queue_s = self._launched_queue_s, self._completed_queue_s
        self._launched_s, self._completed_s = [], []
        self._launched_queue_s, self._completed_queue_s = [], []
        self.last_cpu_wait_s = 0.0
        if not launched or not completed:
            return 0.0  # no bucket communicated (e.g. a no_sync micro-batch)
        # Both lists grow in time order: the last entries are the last launch and completion.
        self.last_cpu_wait_s = max(0.0, completed_queue_s[-1] - launched_queue_s[-1])
        return max(0.0, max(completed) - max(launched))

"""How workers and the driver talk without the driver joining every step.

Workers fire-and-forget small records (one per `logger.log_every_n_steps`, one per epoch, a
heartbeat when otherwise silent, their state at checkpoint boundaries) to a `MetricsSink` actor,
in batches (distrain/worker.py `REPORT_EVERY_S`); the driver drains it a few times a second. The
sink is also where the workers agree at each checkpoint boundary whether to stop and whether to
checkpoint: the first rank to ask fixes the answer for every rank, so all ranks stop (and take
part in a checkpoint, which under ZeRO is a collective) at the same step, even though the
driver's stop request reaches them at different moments. A group that is to grow back in place
(distrain/elastic.py) also asks after every step whether to pause there (`pause_at`): the same
rule, the first rank to ask about a step fixes the answer.
"""

from __future__ import annotations

import math
import time

import ray

from distrain.records import Record

# A group growing back in place asks about a step this many steps ahead (distrain/worker.py), so
# it stops at most this many steps and one after the request.
PAUSE_LAG_STEPS = 2
FORGET_PAUSES_AFTER_STEPS = 100


@ray.remote(num_cpus=0)
class MetricsSink:
    def __init__(self, checkpoint_min_interval_s: float = 0.0) -> None:
        self._records: list[Record] = []
        self._stop_requested = False
        self._pause_requested = False
        self._decisions: dict[int, tuple[bool, bool]] = {}
        self._pauses: dict[int, bool] = {}
        self._checkpoint_min_interval_s = checkpoint_min_interval_s
        self._last_checkpoint_s = -math.inf
        self._saved_step = -1

    def reset(self, checkpoint_min_interval_s: float) -> None:
        """Start afresh for the next job of a sweep (distrain/warm_workers.py)."""
        self.__init__(checkpoint_min_interval_s)  # type: ignore[misc]

    def push(self, record: Record) -> None:
        self._records.append(record)

    def push_many(self, records: list[Record]) -> None:
        for record in records:
            self.push(record)

    def drain(self) -> list[Record]:
        records, self._records = self._records, []
        return records

    def request_stop(self) -> None:
        self._stop_requested = True

    def request_pause(self) -> None:
        """Stop at the next step, or the next checkpoint boundary if it comes first; no
        checkpoint is asked for (the workers keep their state: an in-place grow back)."""
        self._pause_requested = True

    def pause_at(self, step: int) -> bool:
        """Whether to stop after `step` (not a checkpoint boundary): the same answer for every
        rank."""
        answer = self._pauses.setdefault(step, self._pause_requested)
        # The ranks are within a step of each other: none asks this far back again (the answers
        # would otherwise pile up, one a step, for as long as the group is smaller).
        self._pauses.pop(step - FORGET_PAUSES_AFTER_STEPS, None)
        return answer

    def decide(self, step: int, final: bool) -> tuple[bool, bool]:
        """(stop, checkpoint) at the boundary after `step`: the same answer for every rank.

        A checkpoint is taken when stopping, at the `final` boundary, and otherwise when the
        last one is at least trainer.checkpoint_min_interval_s old.
        """
        if step not in self._decisions:
            now, stop = time.monotonic(), self._stop_requested or self._pause_requested
            due = now - self._last_checkpoint_s >= self._checkpoint_min_interval_s
            checkpoint = self._stop_requested or final or due
            if checkpoint:
                self._last_checkpoint_s = now
            self._decisions[step] = (stop, checkpoint)
        return self._decisions[step]

    def saved(self, step: int) -> None:
        """The driver has written the checkpoint of `step` (trainer.async_checkpoint=false)."""
        self._saved_step = max(self._saved_step, step)

    def saved_step(self) -> int:
        return self._saved_step

    def node_ip(self) -> str:
        """Where the sink runs; answering also says it is up."""
        return ray.util.get_node_ip_address()

    def flush(self) -> None:
        """A no-op: once it returns, every earlier push from the same caller has been stored."""

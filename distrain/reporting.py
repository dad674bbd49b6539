"""How workers and the driver talk without the driver joining every step.

Workers fire-and-forget small records (one per `logger.log_every_n_steps`, one per epoch, a
heartbeat when otherwise silent, their state at checkpoint boundaries) to a `MetricsSink` actor,
in batches (distrain/worker.py `REPORT_EVERY_S`); the driver drains it a few times a second. The
sink is also where the workers agree on stopping: at a checkpoint boundary the first rank to ask
fixes the answer for every rank, so all ranks stop at the same step even though the driver's stop
request reaches them at different moments.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class MetricsSink:
    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._stop_requested = False
        self._decisions: dict[int, bool] = {}

    def push(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def push_many(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.push(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records

    def request_stop(self) -> None:
        self._stop_requested = True

    def decide_stop(self, step: int) -> bool:
        """Whether to stop at the boundary after `step`: the same answer for every rank."""
        return self._decisions.setdefault(step, self._stop_requested)

    def flush(self) -> None:
        """A no-op: once it returns, every earlier push from the same caller has been stored."""

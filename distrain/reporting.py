"""How workers' metrics reach the driver without the driver joining every step.

Workers fire-and-forget small records (one per `logger.log_every_n_steps` and one per epoch) to a
`MetricsSink` actor, in batches (distrain/worker.py `REPORT_EVERY_S`); the driver drains it a few
times a second. A record is a plain dict.
"""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class MetricsSink:
    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._last_seen_s: dict[int, float] = {}

    def push(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        self._last_seen_s[record["rank"]] = time.time()

    def push_many(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.push(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records

    def last_seen_s(self) -> dict[int, float]:
        """Wall-clock time each rank last reported: the driver's hang detector reads this."""
        return dict(self._last_seen_s)

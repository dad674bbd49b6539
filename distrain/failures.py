"""The supervisor's account of failures: how many, how long each cost, which nodes to avoid.

Each failure becomes one entry of metrics.json's `failures`: its error, and once training goes
on again `detection_s` (last progress -> failure noticed), `recovery_s` (noticed -> a working
group) and `downtime_s` (last progress before -> first progress after, so a partition's wait
for the timeout counts, not only the restart); a heal adds what it did (`healed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain.errors import GroupFailed, TrainingFailed


@dataclass
class Failure:
    """One failure. The two clock readings (`time.monotonic()`) are working state: they become
    the durations once the group recovers and progresses, and never reach metrics.json."""

    error: str
    noticed_at_s: float  # when the failure was noticed (before any stack dump or probe)
    last_progress_at_s: float  # the last step or epoch record before it, from any rank
    recovery_s: float | None = None
    healed: dict[str, Any] | None = None
    detection_s: float | None = None
    downtime_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """metrics.json's entry: the error and the durations known (a run that gave up, or a
        failure with no progress after it, has fewer)."""
        durations = {
            "detection_s": self.detection_s,
            "recovery_s": self.recovery_s,
            "downtime_s": self.downtime_s,
            "healed": self.healed,
        }
        return {"error": self.error} | {k: v for k, v in durations.items() if v is not None}


class FailureLog:
    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures: list[Failure] = []
        self.excluded_nodes: frozenset[str] = frozenset()  # unreachable at an earlier failure
        self.last_progress_s = time.monotonic()  # the last step or epoch record from any rank

    def __len__(self) -> int:
        return len(self.failures)

    def to_json(self) -> list[dict[str, Any]]:
        return [failure.to_json() for failure in self.failures]

    def count(
        self, failure: GroupFailed, *, here: str, latest: Path | None, resume_dir: Path
    ) -> None:
        """Record `failure`; past `max_failures` the run ends, naming `latest`, the checkpoint
        to continue from. `here` is the driver's node."""
        # A node that did not answer is avoided from now on: Ray counts it alive for a minute
        # or more, and a group placed on it would wait for Ray to declare it dead. The driver's
        # own node always answers, whatever a probe under load said.
        self.excluded_nodes |= failure.unreachable_nodes - {here}
        self.failures.append(
            Failure(
                error=str(failure),
                noticed_at_s=failure.noticed_s or time.monotonic(),
                # from the last progress anyone saw: what a user waits, detection included
                last_progress_at_s=self.last_progress_s,
            )
        )
        if len(self.failures) > self.max_failures:
            kept = f"the last checkpoint is {latest}" if latest else "no checkpoint was written"
            raise TrainingFailed(
                f"{failure} — gave up after trainer.max_failures={self.max_failures} restarts; "
                + kept
                + (f" (continue with resume={resume_dir})." if latest else ".")
            ) from None

    def recovered(self, healed: dict[str, Any] | None = None) -> None:
        """A working group again after the last failure (`healed`: what the heal did). A group
        started to grow back after a recovery is not one."""
        last = self.failures[-1] if self.failures else None
        if last is not None and last.recovery_s is None:
            last.recovery_s = time.monotonic() - last.noticed_at_s
            last.healed = healed

    def progressed(self, now_s: float) -> None:
        """A step or epoch record arrived: after a failure, the first one closes its downtime."""
        self.last_progress_s = now_s
        last = self.failures[-1] if self.failures else None
        if last is not None and last.downtime_s is None:
            last.detection_s = last.noticed_at_s - last.last_progress_at_s
            last.downtime_s = now_s - last.last_progress_at_s

"""Which worker holds the others back, and by how much.

In synchronous training every worker waits for the slowest at each all-reduce, so wall time per
step is the same everywhere; what differs is the *busy* time (data + forward/backward + optimizer,
distrain/metrics.py). A worker whose busy time per step stays above the median of the others'
by more than `threshold` for `patience` consecutive logged intervals is a straggler: reported
once, with its node; it can be reported again after `patience` intervals back under the threshold.

A ratio alone is not evidence on tiny steps: workers sharing cores with other processes lose a
few milliseconds to the OS scheduler now and then, which is 1.5x of a 1 ms step. So a straggler
must also have cost real time: over its `patience` intervals its compute must exceed the others'
median by at least `min_excess_s` in total (default 0.1 s, well above scheduling jitter of a few
ms per interval, far below what a slow GPU or an overloaded node costs).

Why it is slower is told too: on a CPU the step clock counts how long the worker waited, ready to
run, for a core that other processes held (`cpu_wait_s`, distrain/timing.py). When that wait
accounts for at least half of its extra compute, the report says the worker is starved of CPU on
its node (`cause="cpu_contention"`: too many processes there) rather than slow at its own work
(`cause="compute"`: a slower device, a bigger shard, a throttled core).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from distrain.metrics import StepMetrics

MIN_EXCESS_S = 0.1  # seconds of extra compute over `patience` intervals (see the docstring)
CONTENTION_SHARE = 0.5  # of the extra compute, waiting for a core: the node is oversubscribed


@dataclass
class Straggler:
    rank: int
    node_ip: str
    ratio: float  # its busy time per step / the median of the other workers'
    busy_s: float
    others_busy_s: float
    step: int  # the logged step at which it was declared
    intervals: int  # consecutive logged intervals above the threshold
    cpu_wait_s: float | None = None  # of busy_s, waiting for a CPU core; None where unknown
    others_cpu_wait_s: float | None = None

    @property
    def cause(self) -> str:
        """Why it lags: "cpu_contention" when waiting for a core explains it, else "compute"."""
        if self.cpu_wait_s is None or self.others_cpu_wait_s is None:
            return "compute"
        extra_wait_s = self.cpu_wait_s - self.others_cpu_wait_s
        contended = extra_wait_s >= CONTENTION_SHARE * (self.busy_s - self.others_busy_s)
        return "cpu_contention" if contended else "compute"

    @property
    def message(self) -> str:
        why = ""
        if self.cause == "cpu_contention":
            why = (
                f"; {self.cpu_wait_s * 1e3:.1f} ms of it waiting for a CPU core that other "
                "processes on its node held"
            )
        return (
            f"straggler: rank {self.rank} on node {self.node_ip} is {self.ratio:.2f}x slower than "
            f"the other workers ({self.busy_s * 1e3:.1f} ms vs {self.others_busy_s * 1e3:.1f} ms "
            f"of compute per step{why}) for {self.intervals} logged intervals, up to step "
            f"{self.step}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cause": self.cause, "message": self.message}


class StragglerDetector:
    def __init__(
        self,
        node_ips: list[str],
        *,
        threshold: float,
        patience: int,
        min_excess_s: float = MIN_EXCESS_S,
    ) -> None:
        self.node_ips = node_ips
        self.threshold = threshold  # a ratio: busy time per step / the others' median
        self.patience = patience
        self.min_excess_s = min_excess_s
        self._above: dict[int, int] = {}  # the current slowest rank: intervals above threshold
        self._excess_s = 0.0  # its compute beyond the others' median, summed over those
        self._below = 0  # intervals the flagged rank has been back under the threshold
        self.flagged: int | None = None  # the rank currently reported as straggling
        self.reports: list[Straggler] = []

    def update(self, metrics: StepMetrics) -> Straggler | None:
        """Feed one logged interval; returns a Straggler when one is newly declared."""
        busy = {rank: w.busy_s for rank, w in metrics.workers.items()}
        if len(busy) < 2:
            return None
        ratios = {
            rank: busy_s / max(statistics.median(v for r, v in busy.items() if r != rank), 1e-12)
            for rank, busy_s in busy.items()
        }
        if self.flagged is not None:
            # The same patience to clear as to declare: a noisy worker is not re-reported at
            # every other interval.
            self._below = self._below + 1 if ratios[self.flagged] <= self.threshold else 0
            if self._below >= self.patience:
                self.flagged = None
        slowest = max(ratios, key=ratios.__getitem__)
        if ratios[slowest] <= self.threshold:
            self._above.clear()
            return None
        others_s = statistics.median(v for r, v in busy.items() if r != slowest)
        steps = metrics.per_rank[slowest].steps
        excess_s = (busy[slowest] - others_s) * steps
        self._excess_s = excess_s + (self._excess_s if slowest in self._above else 0.0)
        self._above = {slowest: self._above.get(slowest, 0) + 1}
        if self._above[slowest] < self.patience or self.flagged == slowest:
            return None
        if self._excess_s < self.min_excess_s:  # scheduling noise on tiny steps, not a straggler
            return None
        self.flagged, self._below = slowest, 0
        waits = {rank: w.cpu_wait_s for rank, w in metrics.workers.items()}
        others_waits = [v for r, v in waits.items() if r != slowest]
        known = waits[slowest] is not None and None not in others_waits
        report = Straggler(
            rank=slowest,
            node_ip=self.node_ips[slowest],
            ratio=ratios[slowest],
            busy_s=busy[slowest],
            others_busy_s=others_s,
            step=metrics.step,
            intervals=self._above[slowest],
            cpu_wait_s=waits[slowest] if known else None,
            others_cpu_wait_s=statistics.median(others_waits) if known else None,
        )
        self.reports.append(report)
        return report

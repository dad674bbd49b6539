"""Elastic training: how many workers a new group gets after a failure, and growing back.

After a failure the supervisor tries the configured worker count first, then fewer (down to
`trainer.min_workers`), keeping the global batch: fewer workers accumulate more micro-batches
(`StepPlan.on`, distrain/plan.py). While a group runs on fewer workers, a `GrowProbe` waits for
the capacity of the missing ones to come back (a node joins, a lost one returns). Then, where a
failure would heal in place (distrain/healing.py: every rank holds the whole state), new workers
start in the probe's reservation while the group trains on (or ready warm spares are taken for
them), the group pauses after a step once they are ready, keeps its workers and adds the new
ones, all starting from one worker's state in memory (`healing.grow`); elsewhere it stops at its
next checkpoint boundary and the configured count starts from that checkpoint. Either way the
same global batch, so the same mathematics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from distrain import reservation
from distrain.config import ConfigError


def candidate_world_sizes(configured: int, min_workers: int | None) -> list[int]:
    """Worker counts to try, most first: divisors of the configured count down to `min_workers`
    (a divisor keeps the original per-worker batch a whole number of micro-batches)."""
    low = min_workers or configured
    return [w for w in range(configured, low - 1, -1) if configured % w == 0]


def choose_world_size(
    configured: int, min_workers: int | None, check_fits: Callable[[int], None], *, shrink: bool
) -> int:
    """The most workers that fit: `check_fits(world_size)` raises `ConfigError` when they do
    not. Without `shrink` (the first start) only the configured count is tried; after a failure,
    fewer down to `min_workers`, and the smallest one's error is raised if none fits."""
    candidates = candidate_world_sizes(configured, min_workers) if shrink else [configured]
    for world_size in candidates[:-1]:
        try:
            check_fits(world_size)
        except ConfigError:  # try fewer
            continue
        return world_size
    check_fits(candidates[-1])
    return candidates[-1]


def fits_within(check_fits: Callable[[int], None], world_size: int, seconds: float) -> bool:
    """Whether `world_size` workers fit within `seconds`. Growing back, the probe that showed
    they fit held their resources until a moment ago, and Ray frees them asynchronously: a
    check made at once saw too few and started the smaller group again."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            check_fits(world_size)
            return True
        except ConfigError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


class GrowProbe:
    """A placement group for the workers a shrunk group lacks, left pending until Ray can place
    it beside the running group: then the configured count fits again (once the running group
    is released). Pending, it is also what an autoscaler sees as demand.

    Ray places it, so every placement rule is Ray's own: under STRICT_SPREAD the missing
    workers must find nodes the group does not use (a label selector; a Ray without them gets
    no probe), under STRICT_PACK the whole group must fit one node, which a probe beside it
    cannot show, so STRICT_PACK groups do not grow back.
    """

    def __init__(
        self, missing: reservation.WorkerResources, placement: str, running_nodes: Iterable[str]
    ) -> None:
        self.group = None
        avoid = set(running_nodes) if placement == "STRICT_SPREAD" else set()
        avoid |= missing.excluded_nodes
        if placement == "STRICT_PACK" or (avoid and not reservation.takes_label_selectors()):
            return
        options = {}
        if avoid:
            selector = {reservation.NODE_ID_LABEL: f"!in({','.join(sorted(avoid))})"}
            options["bundle_label_selector"] = [selector] * missing.workers
        self.group = placement_group(
            [missing.bundle()] * missing.workers, strategy=placement, **options
        )
        self.ready_ref = self.group.ready()

    def ready(self) -> bool:
        """Placed (non-blocking): the missing workers fit now."""
        return self.group is not None and bool(ray.wait([self.ready_ref], timeout=0)[0])

    def take(self) -> Any:
        """The placed reservation, for the missing workers to start in; the caller owns it."""
        group, self.group = self.group, None
        return group

    def close(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None

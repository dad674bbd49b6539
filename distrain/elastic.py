"""Elastic training: how many workers a new group gets after a failure, and its job.

After a failure the supervisor tries the configured worker count first, then fewer (down to
`trainer.min_workers`), keeping the global batch: fewer workers accumulate more micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distrain.config import ConfigError


def job_for_workers(job: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The job on `world_size` workers, same global batch: fewer workers accumulate more
    micro-batches of the original per-worker size, so memory per step stays where it was."""
    if world_size == job["trainer"]["workers"]:
        return job
    data = dict(job["data"])
    data["micro_batch_size"] = data.get("micro_batch_size") or (
        data["batch_size"] // job["trainer"]["workers"]
    )
    return {**job, "data": data, "trainer": {**job["trainer"], "workers": world_size}}


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

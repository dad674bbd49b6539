"""Elastic training: how many workers a new group gets after a failure.

After a failure the supervisor tries the configured worker count first, then fewer (down to
`trainer.min_workers`), keeping the global batch: fewer workers accumulate more micro-batches
(`StepPlan.on`, distrain/plan.py).
"""

from __future__ import annotations

from collections.abc import Callable

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

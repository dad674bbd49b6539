"""Elastic planning: which worker count a new group gets after a failure."""

from __future__ import annotations

import pytest

from distrain import elastic
from distrain.errors import ConfigError


def _fits_up_to(most: int, tried: list[int]):
    """A cluster that holds at most `most` workers; records each count asked about."""

    def check_fits(world_size: int) -> None:
        tried.append(world_size)
        if world_size > most:
            raise ConfigError(f"{world_size} workers do not fit")

    return check_fits


def test_the_first_start_takes_the_configured_count_or_fails_with_its_error() -> None:
    tried: list[int] = []
    assert elastic.choose_world_size(4, 1, _fits_up_to(4, tried), shrink=False) == 4
    with pytest.raises(ConfigError, match=r"^4 workers do not fit"):
        elastic.choose_world_size(4, 1, _fits_up_to(2, tried), shrink=False)
    assert tried == [4, 4]  # never fewer before a failure, whatever min_workers allows


def test_after_a_failure_the_most_divisors_that_fit() -> None:
    tried: list[int] = []
    assert elastic.choose_world_size(4, 1, _fits_up_to(3, tried), shrink=True) == 2
    assert tried == [4, 2]  # 3 does not divide 4: the per-worker batch would not split evenly
    assert elastic.candidate_world_sizes(6, 2) == [6, 3, 2]
    assert elastic.candidate_world_sizes(4, None) == [4]  # no min_workers: never fewer


def test_when_none_fits_the_smallest_allowed_count_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^2 workers do not fit"):
        elastic.choose_world_size(4, 2, _fits_up_to(1, []), shrink=True)
    # min_workers=3 is no divisor of 4: the only candidate is 4, and its error is raised
    # (this used to end in an AssertionError).
    with pytest.raises(ConfigError, match=r"^4 workers do not fit"):
        elastic.choose_world_size(4, 3, _fits_up_to(2, []), shrink=True)


def test_growing_back_waits_briefly_for_the_released_probe_to_fit() -> None:
    """Ray frees a removed placement group's resources asynchronously: the configured count
    may fail a check made at once and fit a moment later."""
    checks = []

    def check_fits(world_size: int) -> None:
        checks.append(world_size)
        if len(checks) < 3:
            raise ConfigError("not yet")

    assert elastic.fits_within(check_fits, 2, seconds=5.0) and checks == [2, 2, 2]

    def never_fits(world_size: int) -> None:
        raise ConfigError("a node is gone")

    assert not elastic.fits_within(never_fits, 2, seconds=0.3)

"""Slowness made on purpose, for tests, benchmarks and demos: never part of a job's config.

    DISTRAIN_SLOW_RANK=1:0.03 distrain ...     # rank 1 sleeps 30 ms in every step
    DISTRAIN_SLOW_CHECK_S=5 distrain ...       # the driver's dry build starts 5 s late

The sleep is counted as the rank's data time, as a worker reading from a slower disk would be.
The straggler detector's tests use it, and the fault tests use it to keep a run going long
enough to be interrupted (the result does not change). The driver reads the variable once, in
its own environment, checks it before any actor starts and hands the workers a `SlowRank`; the
workers' environment (a cluster's, started elsewhere) plays no part.

A slow check stands for a dry build that takes longer than the embedded Ray's start (a large
dataset): the tests use it to see a mistake found after the workers started (early_start.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from distrain.errors import ConfigError

SLOW_RANK_ENV = "DISTRAIN_SLOW_RANK"
SLOW_CHECK_ENV = "DISTRAIN_SLOW_CHECK_S"


@dataclass(frozen=True)
class SlowRank:
    rank: int
    step_delay_s: float

    def delay_s(self, rank: int) -> float:
        """The sleep per step of `rank`."""
        return self.step_delay_s if rank == self.rank else 0.0


def slow_rank_from_env(workers: int, environ: Mapping[str, str] = os.environ) -> SlowRank | None:
    """The rank to slow down, from DISTRAIN_SLOW_RANK=RANK:SECONDS (None: unset or empty)."""
    value = environ.get(SLOW_RANK_ENV, "").strip()
    if not value:
        return None
    rank_text, _, seconds_text = value.partition(":")
    try:
        slow = SlowRank(int(rank_text), float(seconds_text))
    except ValueError:
        slow = None
    if slow is None or not 0 <= slow.rank < workers or not 0 <= slow.step_delay_s < 3600:
        raise ConfigError(
            f"{SLOW_RANK_ENV}={value!r} is not allowed: it must be RANK:SECONDS, a rank below "
            f"trainer.workers={workers} and the seconds it sleeps per step (>= 0), e.g. "
            f"{SLOW_RANK_ENV}=1:0.03; unset it for a normal run."
        )
    return slow


def check_delay_s_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The seconds the dry build waits first, from DISTRAIN_SLOW_CHECK_S (0: unset or empty)."""
    value = environ.get(SLOW_CHECK_ENV, "").strip()
    if not value:
        return 0.0
    try:
        delay_s = float(value)
    except ValueError:
        delay_s = -1.0
    if not 0 <= delay_s < 3600:
        raise ConfigError(
            f"{SLOW_CHECK_ENV}={value!r} is not allowed: it must be the seconds the driver's dry "
            f"build waits before it starts (>= 0), e.g. {SLOW_CHECK_ENV}=5; unset it for a normal "
            "run."
        )
    return delay_s

"""A slow worker made on purpose, for tests, benchmarks and demos: never part of a job's config.

    DISTRAIN_SLOW_RANK=1:0.03 distrain ...     # rank 1 sleeps 30 ms in every step

The sleep is counted as the rank's data time, as a worker reading from a slower disk would be.
The straggler detector's tests use it, and the fault tests use it to keep a run going long
enough to be interrupted (the result does not change). The driver reads the variable once, in
its own environment, checks it before any actor starts and hands the workers a `SlowRank`; the
workers' environment (a cluster's, started elsewhere) plays no part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from distrain.errors import ConfigError

SLOW_RANK_ENV = "DISTRAIN_SLOW_RANK"


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

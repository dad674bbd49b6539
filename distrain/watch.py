"""What the driver watches for while a group trains, and how it classifies what went wrong.

A rank's `fit` ends in a result or a failure: an infrastructure failure (a dead actor, a collective
broken by a vanished peer, a silent rank) is a `GroupFailed`, worth a restart from the last
checkpoint; anything else the worker raised is a `TrainingFailed` (a restart would repeat it).
Ctrl-C and SIGTERM become a `StopRequest` flag, so the driver stops at a checkpoint.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from distrain import hangs
from distrain.errors import ConfigError, GroupFailed, TrainingFailed, is_transport_failure
from distrain.group import WorkerGroup
from distrain.loop import NonFiniteError
from distrain.records import RankResult
from distrain.reporting import PAUSE_LAG_STEPS


def rank_result(ref: ray.ObjectRef, rank: int, group: WorkerGroup) -> RankResult:
    """What `rank`'s `fit` returned, or its failure classified (restart or not)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as error:  # the process or its node is gone
        raise GroupFailed(
            f"{group.where(rank)} died: {first_line(error)}", failed_ranks=frozenset({rank})
        ) from None
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, NonFiniteError):
            raise TrainingFailed(str(cause)) from None
        if isinstance(cause, ConfigError):  # bad data found in a batch (a token id)
            raise ConfigError(f"{group.where(rank)}: {cause}") from None
        # gloo and NCCL report a vanished peer as DistError or a RuntimeError naming the backend.
        if is_transport_failure(cause):
            # A collective broke because a peer went away: infrastructure, so restart. The
            # peer's own death may be reported a moment later; name it if it is.
            dead = _dead_peers(group, exclude=rank)
            raise GroupFailed(
                ", ".join(f"{group.where(r)} died" for r in dead)
                or f"{group.where(rank)}: {first_line(cause)}",
                failed_ranks=frozenset(dead),
            ) from None
        raise TrainingFailed(
            f"{group.where(rank)} raised {type(cause).__name__}: {cause} "
            "(its traceback is printed above)"
        ) from None


def _dead_peers(group: WorkerGroup, exclude: int, grace_s: float = 3.0) -> list[int]:
    """Ranks whose actor is dead, waiting up to `grace_s` for Ray to report it."""
    probes = {w.node.remote(): r for r, w in enumerate(group.workers) if r != exclude}
    dead = []
    for ref, rank in probes.items():
        try:
            ray.get(ref, timeout=grace_s)
        except ray.exceptions.RayActorError:
            dead.append(rank)
        except ray.exceptions.GetTimeoutError:
            pass  # busy (in a collective) or frozen: alive as far as Ray knows
    return dead


def check_hang(
    running: set[int],
    last_seen_s: dict[int, float],
    group: WorkerGroup,
    *,
    timeout_s: float,
    stacks_dir: Path,
) -> None:
    """Fail the group if a running rank sent nothing for `timeout_s`; every rank's stack goes to
    `stacks_dir`, and the nodes that could not be asked for one are named unreachable."""
    now = time.monotonic()
    silent = [r for r in running if now - last_seen_s[r] > timeout_s]
    if not silent:
        return
    silent.sort(key=last_seen_s.get)  # the first to fall silent is the likely culprit
    names = ", ".join(f"{group.where(r)}, silent {now - last_seen_s[r]:.0f} s" for r in silent)
    stacks, lost = hangs.dump_stacks(group.nodes, stacks_dir)
    frame = hangs.stuck_frame(stacks.get(silent[0], ""))
    where = f"rank {silent[0]} is in {frame}; " if frame else ""
    raise GroupFailed(
        f"no progress within trainer.step_timeout_s={timeout_s:g} s from {names}: "
        "the worker is hung (stuck collective, frozen process) or its node is lost; "
        f"{where}every rank's stack is in {stacks_dir}",
        unreachable_nodes=lost,
        failed_ranks=frozenset(silent),
        noticed_s=now,  # the stacks took up to hangs.DUMP_TIMEOUT_S more: part of the recovery
    )


class StopRequest:
    """Ctrl-C and SIGTERM while workers train: the first asks for a checkpoint and a clean stop,
    the second stops at once (KeyboardInterrupt). A flag, not an exception, so the driver never
    loses records it was in the middle of writing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StopAtBoundary:
    """Asks a running group, once, to stop at its next checkpoint boundary: on Ctrl-C/SIGTERM,
    waiting at most `stop_timeout_s` for it, to grow back to the configured worker count (or
    after its next step, growing back in place), or because its validation loss stopped
    improving (distrain/early_stopping.py)."""

    def __init__(self, sink: Any, stop_timeout_s: float, message: Callable[[str], None]) -> None:
        self.sink, self.stop_timeout_s, self.message = sink, stop_timeout_s, message
        self.deadline_s: float | None = None  # a stop was asked for
        self.growing = False
        self.early_stop_reason: str | None = None

    def stop_waited_out(self, requested: bool) -> bool:
        """Ask for the stop once it is `requested`; True once it was waited for long enough."""
        if requested and self.deadline_s is None:
            self.message(
                "stopping: the workers write a checkpoint at the next boundary "
                f"(up to {self.stop_timeout_s:g} s; Ctrl-C again to stop now)"
            )
            self.sink.request_stop.remote()
            self.deadline_s = time.monotonic() + self.stop_timeout_s
        return self.deadline_s is not None and time.monotonic() > self.deadline_s

    def grow_back(self, workers: int, *, in_place: bool) -> None:
        """The configured `workers` fit again: stop to start them at the next checkpoint
        boundary, or (`in_place`: the new workers are ready) after the next step."""
        self.growing = True
        if in_place:
            self.message(
                "elastic: the new workers are ready; growing back in place within "
                f"{PAUSE_LAG_STEPS + 1} steps"
            )
            self.sink.request_pause.remote()
            return
        self.message(
            f"elastic: there is room for trainer.workers={workers} workers again; growing back "
            "at the next checkpoint boundary"
        )
        self.sink.request_stop.remote()

    def stop_early(self, reason: str) -> None:
        """Training has stopped paying: stop at the boundary, and end the run there as done."""
        self.early_stop_reason = reason
        self.message(f"early stopping: {reason}; stopping at the next checkpoint boundary")
        self.sink.request_stop.remote()

    @property
    def asked(self) -> bool:
        """Whether the group was already asked to stop, for any reason."""
        return self.deadline_s is not None or self.growing or self.early_stop_reason is not None


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message, at most 300 characters."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__

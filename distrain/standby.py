"""Workers without a rank yet, warming up beside a group: warm spares (`trainer.spare_workers`),
which take a failed rank's place without a start-up, and the workers a grow back adds (new ones
started while the group trains on, spares taken for them, or survivors waiting for them).

The group (distrain/group.py) starts and hands them out; here is only their state and the
non-blocking checks of who is ready, which the supervisor makes a few times a second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

log = logging.getLogger("distrain")
Bundle = tuple[Any, int]  # a placement group (a reservation) and the index of one of its bundles


@dataclass
class Spare:
    """A worker started beside the group, to take a rank's place without a start-up."""

    actor: Any
    name: str
    bundle: Bundle | None  # its bundle of the group's reservations (None: placed outside)
    warm: Any  # the ObjectRef of its `Worker.warm`: its node, once it is ready
    started_s: float
    ready_s: float | None = None  # seconds it took to warm up, once it has
    node: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ready_now(cls, actor: Any, name: str, bundle: Bundle | None, node: dict[str, Any]) -> Spare:
        """A worker that is ready as it stands (a survivor that has been training)."""
        return cls(actor, name, bundle, ray.put(node), time.monotonic(), ready_s=0.0, node=node)


def newly_ready(spares: list[Spare]) -> bool:
    """Whether a spare of `spares` finished warming up since the last call (`ready_s` then says
    which are ready, and how long each took). One that failed to is killed and removed from
    `spares`."""
    pending = [spare for spare in spares if spare.ready_s is None]
    refs = [spare.warm for spare in pending]
    done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
    for spare in (spare for spare in pending if spare.warm in done):
        try:
            spare.node = ray.get(spare.warm)
            spare.ready_s = round(time.monotonic() - spare.started_s, 3)
        except ray.exceptions.RayError as error:
            log.warning("a spare worker failed to warm up, dropped: %s", error)
            spares.remove(spare)
            ray.kill(spare.actor)
    return any(spare.ready_s is not None for spare in pending)


def all_warm(joining: list[Spare]) -> bool:
    """Whether every one of `joining` has warmed up (or failed to: the grow back then fails,
    and the caller grows back from a checkpoint)."""
    refs = [joiner.warm for joiner in joining]
    if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
        return False
    for joiner in joining:  # a spare taken to join knows its warm-up time already
        if joiner.ready_s is None:
            joiner.ready_s = round(time.monotonic() - joiner.started_s, 3)
    return True


def ready_s(spares: list[Spare]) -> dict[str, float]:
    """The ready ones by actor name: the seconds each took to warm up."""
    return {s.name: s.ready_s for s in spares if s.ready_s is not None}

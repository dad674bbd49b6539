"""Workers kept warm between the jobs of one driver process.

A sweep's next job, or a script's next `driver.train(..., keep_workers=True)`, starts on the
worker processes the last job used when it has the same shape (worker count, per-worker CPUs and
GPUs, placement, device type, network interface): torch, `torch._dynamo` and the job's code are
imported there already. A new worker costs about 3 s of CPU and 2-3 s of start-up on a 2-core
machine, most of the time from the command to the first step of a small job.

Written here because Ray keeps no pool of actor processes (an actor's process exits with it), so
the actors themselves are kept: with their placement group, which holds their resources, and the
metrics sink. Only a group that finished cleanly is kept (a failed one may hold a broken
process). A job of another shape, `release()`, or the process's exit (Ray ends an exited
driver's actors) frees them, so the next job's resource check sees everything they held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from distrain.config import ClusterConfig
from distrain.reservation import WorkerResources

log = logging.getLogger("distrain")
ALIVE_TIMEOUT_S = 5.0  # a kept worker that does not answer this soon is not waited for
FREE_TIMEOUT_S = 5.0  # how long freeing them waits for Ray to count their resources free


@dataclass(frozen=True)
class Shape:
    """What a job's workers must share with the kept ones to run on them."""

    workers: int
    cpus: float  # per worker
    gpus: float  # per worker
    placement: str
    device_type: str
    socket_ifname: str | None  # set in each worker's environment when it takes a job

    @classmethod
    def of(cls, need: WorkerResources, cluster: ClusterConfig, device_type: str) -> Shape:
        placement, ifname = cluster.placement.value, cluster.socket_ifname
        return cls(need.workers, need.cpus, need.gpus, placement, device_type, ifname)


@dataclass
class KeptWorkers:
    shape: Shape
    placement_group: Any
    workers: list[Any]  # by rank, rank i in bundle i
    names: list[str]
    sink: Any
    group_id: str
    actors_made: int
    origin: str = "kept from the last job"  # how they came to be ready: workers.json says


_kept: KeptWorkers | None = None  # this driver process's kept group (one at most)


def keep(kept: KeptWorkers) -> None:
    """Keep a cleanly finished group's workers for the next job (any kept before are freed)."""
    global _kept
    release()
    _kept = kept


def claim(shape: Shape) -> KeptWorkers | None:
    """The kept workers, taken, if they have `shape` and all answer; otherwise they are freed
    (so the caller's resource check sees what they held) and None."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    if kept.shape == shape:
        try:
            ray.get([w.node.remote() for w in kept.workers], timeout=ALIVE_TIMEOUT_S)
            return kept
        except ray.exceptions.RayError as error:  # a dead actor, or GetTimeoutError
            log.info("the kept workers are not all alive (%s); starting new ones", error)
    free(kept)
    return None


def kept_actor_names() -> list[str]:
    """The names of the workers kept now (none kept: empty), by rank."""
    return list(_kept.names) if _kept is not None else []


def release() -> None:
    """Free the kept workers, if any: their actors killed, their reservation removed."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        free(kept)


def forget() -> None:
    """Ray is shutting down, and its actors with it: drop the handles."""
    global _kept
    _kept = None


def free(kept: KeptWorkers) -> None:
    """Kill the actors and remove the reservation, then wait (boundedly) until Ray counts what
    they held as available: it frees them asynchronously, and the next job's resource check
    would otherwise find them still taken."""
    shape = kept.shape
    held = {"CPU": shape.workers * shape.cpus, "GPU": shape.workers * shape.gpus}
    wanted = {name: ray.available_resources().get(name, 0.0) + n for name, n in held.items()}
    for handle in [*kept.workers, kept.sink]:
        ray.kill(handle)
    remove_placement_group(kept.placement_group)
    deadline = time.monotonic() + FREE_TIMEOUT_S
    while time.monotonic() < deadline:
        available = ray.available_resources()
        if all(available.get(name, 0.0) >= n - 1e-6 for name, n in wanted.items()):
            return
        time.sleep(0.02)

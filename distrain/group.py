"""One group of worker actors: reserved together, started together, torn down together.

A failure anywhere ends the whole group; the driver's supervisor then starts a new one from the
last checkpoint. Keeping the group's lifecycle in one place makes "no orphan actors" a property of
`shutdown()`, called from a `finally`.
"""

from __future__ import annotations

import errno
import time
import uuid
from dataclasses import asdict
from typing import Any

import ray
import torch
from hydra.utils import get_object
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from distrain import cluster
from distrain import device as devices
from distrain.aggregators.base import GradientAggregator
from distrain.config import Config, plain
from distrain.errors import ConfigError, GroupFailed, SetupTransportFailed, WorkerError
from distrain.plan import StepPlan
from distrain.reporting import MetricsSink
from distrain.worker import Worker

NAMESPACE = "distrain"  # worker actors are named, so `ray.get_actor(name, NAMESPACE)` finds them


# What torch.distributed, gloo and NCCL put in the messages of the failures above.
TRANSPORT_MARKERS = (
    "NCCL",
    "nccl",
    "gloo",
    "Gloo",
    "c10d",
    "EADDRINUSE",
    "address already in use",
    "Address already in use",
    "Connection reset",
    "Connection closed",
    "Connection refused",
)


def is_transport_failure(error: BaseException) -> bool:
    """A collective or the network under it failed (not the user's code): worth a new group.

    torch raises DistError subclasses (DistNetworkError for a store that cannot bind or connect,
    DistBackendError for NCCL); older paths raise a RuntimeError naming the backend.
    """
    if isinstance(error, torch.distributed.DistError | ConnectionError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.EADDRINUSE, errno.ECONNREFUSED):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in TRANSPORT_MARKERS)


class WorkerGroup:
    def __init__(self, job: Config, plan: StepPlan, device_type: str) -> None:
        self.job, self.plan = job, plan
        self.world_size = plan.world_size
        self.device_type = device_type
        self.workers: list[Any] = []
        self.nodes: list[dict[str, Any]] = []
        self.sink: Any = None
        self.sink_ip = "?"  # the sink's node, once it has answered
        self.placement_group: Any = None
        self.rendezvous: dict[str, Any] = {}
        self.startup_s: dict[str, float] = {}
        self.grow_probe: Any = None  # elastic.GrowProbe of a group smaller than configured

    def start(
        self,
        need: cluster.WorkerResources,
        checkpoint_ref: Any | None,
        splits_ref: Any | None = None,
    ) -> None:
        """Reserve, start the actors, rendezvous, build; bounded by trainer.setup_timeout_s.

        `splits_ref`: the driver's in-memory data in the object store (None: workers build it).
        """
        trainer = self.job.trainer
        self.placement_group = cluster.place(need, self.job.cluster)
        started = time.perf_counter()
        # The sink lives on the driver's node: losing another node must not take the metrics.
        # Pinned (soft=False): it needs no CPU, so it always fits there, and a soft preference
        # could let Ray place it on a node that is cut off but not yet declared dead.
        self.sink = MetricsSink.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        ).remote(trainer.checkpoint_min_interval_s)
        actor = ray.remote(Worker)
        group_id = uuid.uuid4().hex[:8]
        self.names = [f"distrain-{group_id}-rank{rank}" for rank in range(self.world_size)]
        self.workers = [
            actor.options(
                name=self.names[rank],
                namespace=NAMESPACE,
                num_cpus=need.cpus,
                num_gpus=need.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=rank
                ),
            ).remote(rank, asdict(self.plan), plain(self.job), self.device_type, self.sink)
            for rank in range(self.world_size)
        ]
        timeout_s = trainer.setup_timeout_s
        # The sink answers before training starts: one slow to come up fails the start (which
        # is retried), not the first drain of a running group (which would count a restart).
        *self.nodes, self.sink_ip = self._get(
            [*(w.node.remote() for w in self.workers), self.sink.node_ip.remote()],
            timeout_s,
            "start",
        )
        self._get(
            [w.place.remote(p) for w, p in zip(self.workers, self._placements())],
            timeout_s,
            "take its device",
        )
        actors_s = time.perf_counter() - started
        aggregator: type[GradientAggregator] = get_object(self.job.aggregator["_target_"])
        self.rendezvous = aggregator.rendezvous(self.workers, self.job.aggregator)
        checkpoint = [checkpoint_ref] if checkpoint_ref is not None else None
        self._get(
            [w.setup.remote(self.rendezvous, checkpoint, splits_ref) for w in self.workers],
            timeout_s,
            "set up",
        )
        # Where start-up time goes: actor processes starting, then building + rendezvous.
        self.startup_s = {"actors": actors_s, "setup": time.perf_counter() - started - actors_s}

    def _placements(self) -> list[devices.DevicePlacement | None]:
        """Each rank's device: on GPUs, every worker of a node sees the node's assigned GPUs."""
        if self.device_type != devices.CUDA:
            return [None] * self.world_size
        ids = [(node["node_id"], node["gpu_ids"]) for node in self.nodes]
        try:
            return list(
                devices.share_visible_devices(
                    ids,
                    noset=any(node["noset"] for node in self.nodes),
                    process_visible=[node["visible"] for node in self.nodes],
                )
            )
        except ValueError as error:  # Ray reserved no GPU for a worker: its accounting is off
            raise GroupFailed(str(error)) from None

    def describe(self) -> list[dict[str, Any]]:
        """Rank, node, pid and actor name of every worker: written to the run dir's workers.json."""
        return [{**node, "actor": name} for node, name in zip(self.nodes, self.names)]

    def drain(self) -> list[dict[str, Any]]:
        # Bounded like a step: a sink that stops answering (its actor died with the driver's
        # node still up, a Ray client cut off from its server) is not waited on for the minute
        # Ray takes to declare a node dead.
        timeout_s = self.job.trainer.step_timeout_s
        try:
            return ray.get(self.sink.drain.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise GroupFailed(
                f"the metrics sink (on node {self.sink_ip}) did not answer within "
                f"trainer.step_timeout_s={timeout_s:g} s (its node unreachable?)"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise GroupFailed(f"the metrics sink died: {error}") from None

    def fit(self) -> dict[Any, int]:
        """Start training on every rank; returns {ObjectRef: rank}."""
        return {w.fit.remote(): rank for rank, w in enumerate(self.workers)}

    def where(self, rank: int) -> str:
        node = self.nodes[rank] if rank < len(self.nodes) else {}
        return f"rank {rank} (node {node.get('node_ip', '?')}, pid {node.get('pid', '?')})"

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> Any:
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise GroupFailed(
                f"the workers did not {what} within trainer.setup_timeout_s={timeout_s:g} s"
            ) from None
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, ConfigError):  # e.g. bf16 asked of a GPU without it
                raise ConfigError(str(cause)) from None
            if is_transport_failure(cause):
                first = next((line for line in str(cause).splitlines() if line.strip()), "")
                raise SetupTransportFailed(
                    f"a worker failed to {what}: {type(cause).__name__}: {first[:300]}"
                ) from None
            raise WorkerError(
                f"a worker failed to {what}: {type(cause).__name__}: {cause}"
                + (
                    " (the module must be importable on every node: install it there, put its "
                    "directory on PYTHONPATH, or ship it with cluster.runtime_env_working_dir=true)"
                    if isinstance(cause, ImportError)
                    else ""
                )
            ) from None
        except ray.exceptions.RayActorError as error:  # e.g. a node that cannot import distrain
            raise GroupFailed(
                f"a worker died while it was to {what}: {cluster.describe_worker_error(error)}"
            ) from None

    def shutdown(self) -> None:
        """Kill every actor of the group and free its reservation; safe to call twice."""
        aggregator_cls = get_object(self.job.aggregator["_target_"])
        for handle in [*self.workers, self.sink, *aggregator_cls.actors(self.rendezvous)]:
            if handle is not None:
                ray.kill(handle)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
        if self.grow_probe is not None:
            self.grow_probe.close()
        self.workers, self.sink, self.placement_group = [], None, None

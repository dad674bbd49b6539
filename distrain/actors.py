"""The Ray actors a job runs on, made in one place: its workers and its metrics sink.

A group's start, its spares and replacements (group.py) and the workers started while the driver
still checks the job (early_start.py) all make them here, with the same options.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from distrain.reporting import MetricsSink
from distrain.reservation import WorkerResources
from distrain.worker import Worker

NAMESPACE = "distrain"  # worker actors are named, so `ray.get_actor(name, NAMESPACE)` finds them


def start_sink(checkpoint_min_interval_s: float) -> Any:
    """The metrics sink, on the driver's node: losing another node must not take the metrics.

    Pinned (soft=False): it needs no CPU, so it always fits there, and a soft preference could
    let Ray place it on a node that is cut off but not yet declared dead.
    """
    return MetricsSink.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
    ).remote(checkpoint_min_interval_s)


def start_worker(
    name: str, need: WorkerResources, placement_group: Any, bundle: int | None, *job: Any
) -> Any:
    """A worker actor in `bundle` of `placement_group`, or (None) outside it, spread over the
    cluster's nodes. `job`: `Worker.take_job`'s arguments, or none for a worker that takes its
    job later (`take_job`)."""
    strategy: Any = (
        PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle
        )
        if bundle is not None
        else "SPREAD"
    )
    return (
        ray.remote(Worker)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=need.cpus,
            num_gpus=need.gpus,
            scheduling_strategy=strategy,
        )
        .remote(*job)
    )

"""Check the cluster can hold the workers, then reserve them: one placement group per group.

Every check here fails in seconds with what is missing and what is available: asking Ray for
resources it does not have would otherwise wait forever for an autoscaler that may not exist.
When the cluster does report an autoscaler, a request within what it may add waits for it
(bounded by `cluster.scale_up_timeout_s`); one beyond that still fails at once.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distrain.config import ClusterConfig, ConfigError

log = logging.getLogger("distrain")


@dataclass(frozen=True)
class WorkerResources:
    workers: int
    cpus: float  # per worker
    gpus: float  # per worker (below 1: workers share a GPU, trainer.gpus_per_worker)
    # Ray node ids not to place workers on (unreachable at an earlier failure, still counted
    # alive by Ray until its health checks give up on them).
    excluded_nodes: frozenset[str] = frozenset()

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        return bundle


@dataclass(frozen=True)
class AutoscalerLimits:
    """What the cluster's autoscaler reports it may grow to: totals and the largest node type."""

    total: dict[str, float]
    per_node: dict[str, float]


def autoscaler_limits() -> AutoscalerLimits | None:
    """The autoscaler's limits as it reports them to the GCS; None without an autoscaler.

    Ray's autoscaler (`ray up`, KubeRay) publishes its node types with their resources and
    min/max counts; a cluster started by hand (`ray start`, SLURM) publishes nothing. Read with
    Ray's own accessor (as Ray Data does); any failure (e.g. Ray Client, an older Ray) counts as
    "no autoscaler", which keeps the strict check.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is None:
            return None
        groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
        if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):
            return None
        total = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config()).items()}
    except Exception as error:
        log.debug("no autoscaler information: %s", error)
        return None
    per_node: dict[str, float] = {}
    for group in groups:
        for key, value in group.resources.items():
            per_node[key] = max(per_node.get(key, 0.0), float(value))
    return AutoscalerLimits(total=total, per_node=per_node)


def check_resources(need: WorkerResources, placement: str) -> bool:
    """Fail at once if the cluster cannot hold `need.workers` workers, now or after scaling up.

    Returns True when the workers fit only once the autoscaler has added nodes.
    """
    available = ray.available_resources()
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    for node in [n for n in nodes if n["NodeID"] in need.excluded_nodes]:
        nodes.remove(node)
        for resource, amount in node["Resources"].items():
            available[resource] = max(available.get(resource, 0.0) - amount, 0.0)
    limits = autoscaler_limits()
    scale_up = False
    for resource, per_worker, knob in (
        ("CPU", need.cpus, "trainer.cpus_per_worker"),
        ("GPU", need.gpus, "trainer.device"),
    ):
        wanted = per_worker * need.workers
        have = available.get(resource, 0.0)
        ceiling = have if limits is None else max(have, limits.total.get(resource, 0.0))
        if wanted > ceiling + 1e-9:
            hint = (
                "lower trainer.workers or trainer.cpus_per_worker, or give an embedded Ray more "
                "logical CPUs with cluster.num_cpus"
                if resource == "CPU"
                else "lower trainer.workers, or train on CPUs with trainer.device=cpu"
            )
            may_add = (
                ""
                if limits is None
                else f"; its autoscaler may grow it to {limits.total.get(resource, 0.0):g}"
            )
            raise ConfigError(
                f"trainer.workers={need.workers} needs {wanted:g} {resource}s ({per_worker:g} "
                f"per worker, {knob}), but the Ray cluster has {have:g} available "
                f"({total.get(resource, 0.0):g} in total on {len(nodes)} node(s){may_add}): "
                f"{hint}."
            )
        scale_up = scale_up or wanted > have + 1e-9
        biggest_node = max((n["Resources"].get(resource, 0.0) for n in nodes), default=0.0)
        if limits is not None:
            biggest_node = max(biggest_node, limits.per_node.get(resource, 0.0))
        if per_worker > biggest_node + 1e-9:
            raise ConfigError(
                f"one worker needs {per_worker:g} {resource}s ({knob}) but the largest node has "
                f"{biggest_node:g}: a worker must fit on one node."
            )
    # An autoscaler may add nodes, so only a cluster without one has a fixed node count.
    if placement == "STRICT_SPREAD" and need.workers > len(nodes) and limits is None:
        raise ConfigError(
            f"cluster.placement=STRICT_SPREAD puts each of trainer.workers={need.workers} workers "
            f"on its own node, but the cluster has {len(nodes)} node(s): use SPREAD or PACK."
        )
    return scale_up


def _brief(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node


def takes_label_selectors() -> bool:
    """Whether this Ray places bundles by node label (newer than distrain's Ray floor); without
    it an excluded node is only left out of the resource count."""
    return "bundle_label_selector" in inspect.signature(placement_group).parameters


def reserve(
    need: WorkerResources, placement: str, timeout_s: float, hint: str = ""
) -> PlacementGroup:
    """A placement group with one bundle per worker; gives up after `timeout_s`."""
    options: dict[str, Any] = {}
    if need.excluded_nodes and takes_label_selectors():
        avoid = {NODE_ID_LABEL: f"!in({','.join(sorted(need.excluded_nodes))})"}
        options["bundle_label_selector"] = [avoid] * need.workers
    group = placement_group([need.bundle()] * need.workers, strategy=placement, **options)
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        raise ConfigError(
            f"the cluster could not place {need.workers} workers of {need.bundle()} with "
            f"cluster.placement={placement} within {timeout_s:g} s; available now: "
            f"{_brief(ray.available_resources())} on "
            f"{sum(n['Alive'] for n in ray.nodes())} node(s){hint}."
        )
    return group


def place(need: WorkerResources, cluster: ClusterConfig, *, scale_up: bool) -> PlacementGroup:
    """Reserve the workers, `check_resources` having said they fit (`scale_up`: only once the
    autoscaler has added nodes), with the wait that verdict calls for."""
    placement = cluster.placement.value
    if not scale_up:
        # Enough is free in total, so only other jobs' reservations or the placement strategy
        # can stand in the way; that shows within seconds.
        return reserve(
            need,
            placement,
            cluster.connect_timeout_s,
            hint=": other jobs may hold them, or the placement strategy cannot be met",
        )
    timeout_s = cluster.scale_up_timeout_s
    log.warning(
        "distrain: the cluster has %s available now; waiting up to %g s "
        "(cluster.scale_up_timeout_s) for its autoscaler to add nodes for %d workers of %s.",
        _brief(ray.available_resources()),
        timeout_s,
        need.workers,
        need.bundle(),
    )
    return reserve(
        need,
        placement,
        timeout_s,
        hint=": the autoscaler did not add the nodes in time (see `ray status`; start them "
        "before the job, or raise cluster.scale_up_timeout_s)",
    )

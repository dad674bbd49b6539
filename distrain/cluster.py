"""Ray: start an embedded one or join a cluster, check it can hold the job, reserve the workers.

Every check here fails in seconds with what is missing and what is available: asking Ray for
resources it does not have would otherwise wait forever for an autoscaler that may not exist.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distrain.config import ConfigError

log = logging.getLogger("distrain")


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of `host:port` or `ray://host:port`; None for `auto`."""
    if address == "auto":
        return None
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"cluster.address={address!r} is not a Ray address: use auto, host:port "
            "(the GCS, usually port 6379) or ray://host:port (Ray Client, usually 10001), "
            "or leave it unset for an embedded local Ray."
        )
    return host, int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """A plain TCP connect first: ray.init on a dead address retries for a minute or more."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as error:
        raise ConfigError(
            f"cluster.address={address!r} is unreachable ({error}; tried for up to "
            f"{timeout_s:g} s). Check that the Ray head is running (`ray status --address "
            f"{target[0]}:{target[1]}`) and that the port is open, or leave cluster.address unset "
            "to start an embedded local Ray."
        ) from None


@contextlib.contextmanager
def connect(cluster: dict[str, Any], runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Join `cluster.address`, or start an embedded Ray that lives as long as this context.

    A Ray already initialised in this process (a test session, a --multirun sweep) is reused and
    left running.
    """
    if ray.is_initialized():
        yield
        return
    address = cluster["address"]
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env,
        "namespace": "distrain",
    }
    if address is None:
        # "local" always starts a new Ray, even when another one runs on this machine.
        kwargs |= {
            "address": "local",
            "num_cpus": cluster["num_cpus"],
            "num_gpus": cluster["num_gpus"],
        }
        kwargs["include_dashboard"] = False
    else:
        check_reachable(address, cluster["connect_timeout_s"])
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except ConnectionError as error:
        raise ConfigError(f"could not join the Ray cluster at {address!r}: {error}") from None
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class WorkerResources:
    workers: int
    cpus: float  # per worker
    gpus: int  # per worker

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        return bundle


def check_resources(need: WorkerResources, placement: str) -> None:
    """Fail at once if the cluster cannot hold `need.workers` workers."""
    available = ray.available_resources()
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    for resource, per_worker, knob in (
        ("CPU", need.cpus, "trainer.cpus_per_worker"),
        ("GPU", need.gpus, "trainer.device"),
    ):
        wanted = per_worker * need.workers
        have = available.get(resource, 0.0)
        if wanted > have + 1e-9:
            hint = (
                "lower trainer.workers or trainer.cpus_per_worker, or give an embedded Ray more "
                "logical CPUs with cluster.num_cpus"
                if resource == "CPU"
                else "lower trainer.workers, or train on CPUs with trainer.device=cpu"
            )
            raise ConfigError(
                f"trainer.workers={need.workers} needs {wanted:g} {resource}s ({per_worker:g} "
                f"per worker, {knob}), but the Ray cluster has {have:g} available "
                f"({total.get(resource, 0.0):g} in total on {len(nodes)} node(s)): {hint}."
            )
        biggest_node = max((n["Resources"].get(resource, 0.0) for n in nodes), default=0.0)
        if per_worker > biggest_node + 1e-9:
            raise ConfigError(
                f"one worker needs {per_worker:g} {resource}s ({knob}) but the largest node has "
                f"{biggest_node:g}: a worker must fit on one node."
            )
    if placement == "STRICT_SPREAD" and need.workers > len(nodes):
        raise ConfigError(
            f"cluster.placement=STRICT_SPREAD puts each of trainer.workers={need.workers} workers "
            f"on its own node, but the cluster has {len(nodes)} node(s): use SPREAD or PACK."
        )


def reserve(need: WorkerResources, placement: str, timeout_s: float) -> PlacementGroup:
    """A placement group with one bundle per worker; gives up after `timeout_s`."""
    group = placement_group([need.bundle()] * need.workers, strategy=placement)
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        raise ConfigError(
            f"the cluster could not place {need.workers} workers of {need.bundle()} with "
            f"cluster.placement={placement} within {timeout_s:g} s; available now: "
            f"{ray.available_resources()}."
        )
    return group

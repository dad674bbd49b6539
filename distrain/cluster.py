"""Ray: start an embedded one or join a cluster, check it can hold the job, reserve the workers.

Every check here fails in seconds with what is missing and what is available: asking Ray for
resources it does not have would otherwise wait forever for an autoscaler that may not exist.
When the cluster does report an autoscaler, a request within what it may add waits for it
(bounded by `cluster.scale_up_timeout_s`); one beyond that still fails at once.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distrain.config import ClusterConfig, ConfigError

log = logging.getLogger("distrain")

PACKAGE_DIR = Path(__file__).resolve().parent
# Never shipped with the runtime environment, even where no .gitignore says so (Ray honours
# .gitignore too); anchored with "/" so that e.g. the package's own data/ stays in.
RUNTIME_ENV_EXCLUDES = ["/.git", "/.venv", "/outputs", "/multirun", "__pycache__", "*.pt"]


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
    """A plain TCP connect, then a gRPC handshake: ray.init on a dead address retries for a
    minute or more, and on a port that is not Ray's it waits for minutes."""
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
    _check_speaks_grpc(address, target, timeout_s)


def _check_speaks_grpc(address: str, target: tuple[str, int], timeout_s: float) -> None:
    """The GCS and the Ray Client server speak gRPC (HTTP/2). A port that accepts TCP but never
    completes the handshake (the dashboard on 8265, some other service) would make ray.init wait
    for minutes, so it is refused here."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS handshake needs Ray's certificates; leave the check to ray.init
    channel = grpc.insecure_channel(f"{target[0]}:{target[1]}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"cluster.address={address!r} accepts connections but does not answer as Ray "
            f"(no gRPC handshake within {timeout_s:g} s): is it the right port? Join the head's "
            "GCS port (6379 unless `ray start --head --port` says otherwise) or, with ray://, "
            "the Ray Client port (10001); 8265 is the dashboard and job API, for `ray job "
            "submit`, not for cluster.address."
        ) from None
    finally:
        channel.close()


def runtime_env(cluster: ClusterConfig) -> dict[str, Any] | None:
    """What Ray ships to the cluster's nodes with the job so they need not have distrain installed.

    A checkout (pyproject.toml beside the package) goes as the working_dir: the workers import
    distrain, and modules beside it, from the shipped copy. An installed package goes alone as a
    py_module, as shipping its site-packages would ship everything.
    """
    if not cluster.runtime_env_working_dir:
        return None
    if cluster.address is None:
        log.warning(
            "cluster.runtime_env_working_dir=true is ignored for the embedded Ray: its workers "
            "run on this machine and import distrain from here."
        )
        return None
    project = PACKAGE_DIR.parent
    if (project / "pyproject.toml").exists():
        return {"working_dir": str(project), "excludes": RUNTIME_ENV_EXCLUDES}
    return {"py_modules": [str(PACKAGE_DIR)], "excludes": RUNTIME_ENV_EXCLUDES}


def describe_worker_error(error: BaseException) -> str:
    """A worker actor's failure to start, in a sentence when the cause is a known setup mistake."""
    text = str(error)
    if "No module named 'distrain'" in text:
        return (
            "the cluster's nodes cannot import distrain (ModuleNotFoundError: No module named "
            "'distrain'). Install it on every node (the same version as here), or let Ray ship "
            "this checkout with the job: cluster.runtime_env_working_dir=true."
        )
    return text


RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def _init(cluster: ClusterConfig) -> None:
    address = cluster.address
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env(cluster),
        "namespace": "distrain",
    }
    if address is None:
        # Ray turns token authentication on for a new local cluster and warns about it on every
        # start. This Ray is private to the job: keep Ray's secure default, drop the notice.
        # (Setting RAY_AUTH_MODE=token here instead would skip Ray's refresh of its cached
        # config and break the start: the notice is filtered, nothing else changes.)
        logging.getLogger(RAY_TOKEN_SETUP_LOGGER).addFilter(_drop_token_auth_notice)
        # "local" always starts a new Ray, even when another one runs on this machine.
        kwargs |= {
            "address": "local",
            "num_cpus": cluster.num_cpus,
            "num_gpus": cluster.num_gpus,
            "include_dashboard": False,
        }
    else:
        check_reachable(address, cluster.connect_timeout_s)
        kwargs["address"] = address
    # ray.init replaces the SIGTERM handler with sys.exit; distrain's own (stop like Ctrl-C,
    # with a checkpoint) must stay, so a scheduler's SIGTERM during start-up still stops cleanly.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _join(kwargs, address)
    finally:
        if threading.current_thread() is threading.main_thread() and callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


# How Ray Client's head reports that the server process it starts for each connection died
# before serving it. On this project's CI machine that happens to about 1 connection in 10 (gRPC's
# event engine in the new process: a segfault, or "epoll_wait error: Bad file descriptor"), and
# once it died importing torch in a deleted working directory. Nothing is wrong with the cluster
# or the job then, and a new connection gets a new server process.
CLIENT_SERVER_DIED = (
    "Starting Ray client server failed",  # it exited before it was serving
    "in start_specific_server",  # it exited while the head was checking on it (ZombieProcess)
    "Proxy failed to Connect to backend",  # it never answered
)
CLIENT_RECONNECTS = 2


def client_server_died(address: str | None, error: BaseException) -> bool:
    """Whether `error`, from joining `address`, says Ray Client's per-connection server died."""
    text = str(error)
    return bool(address and address.startswith("ray://")) and any(
        phrase in text for phrase in CLIENT_SERVER_DIED
    )


def _join(kwargs: dict[str, Any], address: str | None) -> None:
    """`ray.init(**kwargs)`; a Ray Client connection whose server died is made again."""
    for attempt in range(CLIENT_RECONNECTS + 1):
        try:
            ray.init(**kwargs)
            return
        except ConnectionError as error:
            if attempt < CLIENT_RECONNECTS and client_server_died(address, error):
                reason = str(error).strip().splitlines()[-1].rstrip(".")
                log.warning(
                    "Ray Client at %s: the server the head started for this connection died "
                    "(%s); connecting again (%d of %d)",
                    address,
                    reason,
                    attempt + 1,
                    CLIENT_RECONNECTS,
                )
                ray.shutdown()
                continue
            raise ConfigError(f"could not join the Ray cluster at {address!r}: {error}") from None


@contextlib.contextmanager
def connect(cluster: ClusterConfig, *, keep: bool = False) -> Iterator[None]:
    """Join `cluster.address`, or start an embedded Ray that lives as long as this context.

    A Ray already initialised in this process (a test session, a --multirun sweep that keeps one
    with `keep_connected`) is reused and left running. `keep=True` (a sweep's job) leaves the
    Ray it connects to running for the next job (see `keep_connected`).
    """
    if keep:
        keep_connected(cluster)
    if ray.is_initialized():
        yield
        return
    _init(cluster)
    try:
        yield
    finally:
        ray.shutdown()


# The settings of the Ray a --multirun sweep keeps for its jobs (None: none kept).
_kept: tuple[Any, ...] | None = None


def _connection_key(cluster: ClusterConfig) -> tuple[Any, ...]:
    keys = ("address", "num_cpus", "num_gpus", "runtime_env_working_dir")
    return tuple(getattr(cluster, k) for k in keys)


def keep_connected(cluster: ClusterConfig) -> None:
    """Start or join Ray once for the jobs of a sweep, instead of once per job.

    A job whose cluster settings differ from the kept connection's (a sweep over
    cluster.num_cpus, say) gets a new one. The Ray is shut down by `release()`, which runs at the
    end of the sweep and, whatever happens, when the process exits.
    """
    global _kept
    key = _connection_key(cluster)
    if _kept is not None and _kept != key:
        release()
    if ray.is_initialized():
        return
    _init(cluster)
    _kept = key


def release() -> None:
    """Shut down the Ray kept by `keep_connected` (a no-op when none is kept)."""
    global _kept
    if _kept is not None and ray.is_initialized():
        ray.shutdown()
    _kept = None


atexit.register(release)  # a sweep ended by an error or Ctrl-C leaves no Ray behind


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


def place(need: WorkerResources, cluster: ClusterConfig) -> PlacementGroup:
    """Check the cluster can hold the workers, then reserve them: the driver's one call."""
    placement = cluster.placement.value
    if not check_resources(need, placement):
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

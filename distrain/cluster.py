"""Ray: start an embedded one or join a cluster (`connect`), keep one for a sweep's jobs.

A cluster's address is checked in seconds (a TCP connect, a gRPC handshake, then whether it asks
for a token: `ray_auth.py`) before Ray's own connect, which on a dead address retries for a
minute and without a token it needs for 20 s or more. Reserving the workers on the cluster
is `reservation.py`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ray

from distrain import forked_workers, ray_auth, ray_startup, warm_workers
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
    """A plain TCP connect, a gRPC handshake, then the token: ray.init on a dead address retries
    for a minute or more, on a port that is not Ray's it waits for minutes, and without a token
    the cluster asks for it retries for 20 s or more."""
    target = _host_port(address)
    if target is None:
        if (gcs := _auto_address()) is not None and not gcs.startswith("ray://"):
            ray_auth.check_token(address, gcs, timeout_s)
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
    if not address.startswith("ray://"):  # Ray Client's server checks tokens itself
        ray_auth.check_token(address, f"{target[0]}:{target[1]}", timeout_s)


def _auto_address() -> str | None:
    """The GCS `cluster.address=auto` stands for (RAY_ADDRESS, or the cluster `ray start`
    started on this machine), as ray.init finds it; None if none, or if this Ray finds it
    otherwise: ray.init then reports it."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # a private helper of Ray's: any failure means "not known here"
        return None


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
        logging.getLogger(ray_auth.RAY_TOKEN_SETUP_LOGGER).addFilter(
            ray_auth.drop_token_auth_notice
        )
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
    # An embedded Ray without Ray's start-up waits: its dashboard agent on a free port (beside
    # another Ray on this machine, the default one is taken: 3.4 s), no dashboard process
    # (started and waited for even with include_dashboard=False), no autoscaler monitor, a
    # minimal dashboard agent; its workers forked with torch imported (ray_startup.py).
    starts = (
        ray_startup.embedded_start(forked_workers.start() if cluster.fork_workers else None)
        if address is None
        else contextlib.nullcontext()
    )
    try:
        with starts:
            _join(kwargs, address)
    except BaseException:
        forked_workers.stop()  # no Ray, no workers to fork
        raise
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


def version_mismatch(address: str | None, report: str) -> str:
    """Ray's refusal of a driver whose Ray or Python differs from the cluster's (several lines
    of versions), as one paragraph that says what to do."""
    sides = re.findall(r"Ray: (\S+)\s+Python: (\S+)", report)
    if len(sides) == 2:
        (cluster_ray, cluster_python), (own_ray, own_python) = sides
        versions = (
            f"it runs Ray {cluster_ray} on Python {cluster_python}, this process Ray {own_ray} "
            f"on Python {own_python}"
        )
    else:  # a Ray that words it otherwise: its report, on one line
        versions = " ".join(report.split())
    return (
        f"could not join the Ray cluster at {address!r}: {versions}, and Ray joins a driver to a "
        "cluster only when both match. Run distrain from the environment the cluster was "
        "started in, or restart the cluster from this one (`ray stop`, then `ray start --head` "
        "with this environment's ray)."
    )


def _join(kwargs: dict[str, Any], address: str | None) -> None:
    """`ray.init(**kwargs)`; a Ray Client connection whose server died is made again, and the
    ways joining fails for the user's setup are one paragraph (ConfigError)."""
    for attempt in range(CLIENT_RECONNECTS + 1):
        try:
            ray.init(**kwargs)
            return
        except RuntimeError as error:
            if not str(error).startswith("Version mismatch"):
                raise
            raise ConfigError(version_mismatch(address, str(error))) from None
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
def connect(cluster: ClusterConfig, *, keep: bool = False) -> Iterator[bool]:
    """Join `cluster.address`, or start an embedded Ray that lives as long as this context;
    yields whether the Ray outlives it.

    A Ray already initialised in this process (a test session, a --multirun sweep that keeps one
    with `keep_connected`) is reused and left running. `keep=True` (a sweep's job) leaves the
    Ray it connects to running for the next job (see `keep_connected`).
    """
    if keep:
        keep_connected(cluster)
    if ray.is_initialized():
        yield True
        return
    _init(cluster)
    try:
        yield False
    finally:
        ray.shutdown()
        forked_workers.stop()


# The settings of the Ray a --multirun sweep keeps for its jobs (None: none kept).
_kept: tuple[Any, ...] | None = None


def _connection_key(cluster: ClusterConfig) -> tuple[Any, ...]:
    keys = ("address", "num_cpus", "num_gpus", "runtime_env_working_dir", "fork_workers")
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
        warm_workers.forget()  # their actors end with this Ray
        ray.shutdown()
        forked_workers.stop()
    _kept = None


atexit.register(release)  # a sweep ended by an error or Ctrl-C leaves no Ray behind

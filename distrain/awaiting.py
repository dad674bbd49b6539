"""Waiting on a worker group's setup calls (start, take a device, set up, rejoin): the first
failure is raised as soon as it arrives, named as what the supervisor does with it."""

from __future__ import annotations

import time
from typing import Any

import ray

from distrain import cluster, errors
from distrain.errors import ConfigError, GroupFailed, SetupTransportFailed, WorkerError


def awaited(refs: list[Any], timeout_s: float, what: str) -> Any:
    """The results of a group's setup calls (`what` they do, for the message), bounded by
    `timeout_s`; a failure as the supervisor handles it: a user's mistake (`ConfigError`), a
    transport that did not form (`SetupTransportFailed`: retried), a worker's own error
    (`WorkerError`: fatal) or a lost worker (`GroupFailed`: recovered)."""
    try:
        return _first_failure_first(refs, timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise GroupFailed(
            f"the workers did not {what} within trainer.setup_timeout_s={timeout_s:g} s"
        ) from None
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, ConfigError):  # e.g. bf16 asked of a GPU without it
            raise ConfigError(str(cause)) from None
        if errors.is_transport_failure(cause):
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


def _first_failure_first(refs: list[Any], timeout_s: float) -> list[Any]:
    """`ray.get(refs)`, but a failure is raised as soon as it arrives: a worker that died while
    the others wait for it in a rendezvous is not waited out for the whole timeout."""
    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        ready, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} not ready in {timeout_s} s")
        ray.get(ready)  # raises the failure it holds
    return ray.get(refs)

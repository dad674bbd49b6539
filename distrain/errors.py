"""Every way a run can end early, in one place; `cli.EXIT_CODES` maps each to an exit code.

User mistakes (`ConfigError`) and runs that cannot go on (`TrainingFailed`) are what the user sees;
`GroupFailed` and `WorkerError` classify a worker group's failure inside the driver: the first is
worth a restart, the second is not.
"""

from __future__ import annotations

import errno
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration: printed as one paragraph, exit code 2."""


class TrainingFailed(RuntimeError):
    """The run cannot go on: the message says why and where the last checkpoint is."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM handled: the message says how to resume.

    `metrics` is set when the stop arrived as the workers finished their last steps anyway: the
    run is complete (model.pt and metrics.json written) and still ends as interrupted (exit 130),
    so a sweep stops there instead of starting its next job.
    """

    def __init__(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics


class GroupFailed(RuntimeError):
    """Infrastructure failure (a worker died, hung or could not start): worth a restart.

    `unreachable_nodes`: Ray node ids that did not answer a probe when the failure was found (a
    cut link): the next group avoids them while Ray still counts them alive. `failed_ranks`: the
    ranks known to be dead or hung (the others may heal the group, distrain/healing.py); empty
    when the cause is not one rank. `noticed_s`: the `time.monotonic()` at which the failure
    was noticed, when finding out more (a hung rank's stack) took time after it; None: now.
    """

    def __init__(
        self,
        message: str,
        unreachable_nodes: frozenset[str] = frozenset(),
        failed_ranks: frozenset[int] = frozenset(),
        noticed_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.unreachable_nodes = unreachable_nodes
        self.failed_ranks = failed_ranks
        self.noticed_s = noticed_s


class SetupTransportFailed(GroupFailed):
    """A collective or transport failed while the group was forming (NCCL communicator init, a
    rendezvous port taken between picking it and binding it): a new group is likely to succeed,
    so it is retried even on the first start."""


class WorkerError(RuntimeError):
    """A worker's own code raised while setting up (a user class, a missing module): a restart
    would only repeat it."""


# What torch.distributed, gloo and NCCL put in the messages of a transport failure.
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
    "shared-memory all-reduce",  # shm_allreduce: a peer's process exited, or never arrived
)


def is_transport_failure(error: BaseException) -> bool:
    """A collective or the network under it failed (not the user's code): worth a new group.

    torch raises DistError subclasses (DistNetworkError for a store that cannot bind or connect,
    DistBackendError for NCCL); older paths raise a RuntimeError naming the backend.
    """
    import torch.distributed  # here: the CLI imports this module long before torch

    if isinstance(error, torch.distributed.DistError | ConnectionError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.EADDRINUSE, errno.ECONNREFUSED):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in TRANSPORT_MARKERS)

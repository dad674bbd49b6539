"""Issue 15, item 5: a transport failure while a worker group forms is a retryable group
failure, not a fatal worker error; a user's own error stays fatal (real Ray, real torch)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import ray
import torch

from distrain.awaiting import awaited
from distrain.errors import GroupFailed, SetupTransportFailed, WorkerError

pytestmark = pytest.mark.slow


@ray.remote
def _bind_store_on_taken_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        torch.distributed.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=5))


@ray.remote
def _user_error() -> None:
    torch.nn.Linear(3, 2)(torch.zeros(4, 5))


def test_setup_transport_failure_is_retryable(ray_address) -> None:
    with pytest.raises(SetupTransportFailed) as retry:
        awaited([_bind_store_on_taken_port.remote()], 60, "set up")
    assert isinstance(retry.value, GroupFailed) and "EADDRINUSE" in str(retry.value)
    with pytest.raises(WorkerError):
        awaited([_user_error.remote()], 60, "set up")

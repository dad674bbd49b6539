"""The embedded Ray's start-up (distrain/ray_startup.py): its dashboard agent on a free port, and
no dashboard process. End to end, with Ray's default agent port taken, test_cli's Ctrl-C test
shows both on the command's own Ray; the session's Ray here is started the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray._private import ray_constants
from ray._private.node import Node
from ray._private.parameter import RayParams

from distrain.ray_startup import (
    agent_on_any_free_port,
    embedded_start,
    no_dashboard_process_unless_asked,
)


def test_ray_start_parameters_take_any_free_agent_port_only_within() -> None:
    default = RayParams().dashboard_agent_listen_port
    assert default not in (0, None)  # Ray's fixed port: what the block changes
    with agent_on_any_free_port():
        assert RayParams().dashboard_agent_listen_port == 0
        named = RayParams(dashboard_agent_listen_port=61000)
        assert named.dashboard_agent_listen_port == 61000  # a port the caller names stands
    assert RayParams().dashboard_agent_listen_port == default


def test_ray_start_parameters_are_restored_after_an_error() -> None:
    original_init, original_start = RayParams.__init__, Node.start_api_server
    with pytest.raises(RuntimeError), embedded_start():
        raise RuntimeError("ray.init failed")
    assert RayParams.__init__ is original_init
    assert Node.start_api_server is original_start


def test_the_dashboard_process_starts_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[bool | None] = []

    def start_api_server(self: Node, *, include_dashboard: bool | None, raise_on_failure: bool):
        started.append(include_dashboard)  # Ray's own: starts the process and waits for it

    monkeypatch.setattr(Node, "start_api_server", start_api_server)
    with no_dashboard_process_unless_asked():
        for asked in (False, True, None):
            Node.start_api_server(None, include_dashboard=asked, raise_on_failure=False)
    assert started == [True, None]  # asked for, or Ray's default: started as ever
    Node.start_api_server(None, include_dashboard=False, raise_on_failure=False)
    assert started == [True, None, False]  # outside the block, Ray's behaviour again


def test_the_sessions_ray_runs_no_dashboard_process(ray_address: str) -> None:
    node = ray._private.worker._global_node  # the Ray this process started (conftest)
    assert ray_constants.PROCESS_TYPE_DASHBOARD not in node.all_processes
    assert ray_constants.PROCESS_TYPE_RAYLET in node.all_processes
    logs = Path(node.get_logs_dir_path())
    assert not list(logs.glob("dashboard.*")) and list(logs.glob("dashboard_agent.*"))

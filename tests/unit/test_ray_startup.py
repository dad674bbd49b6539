"""The embedded Ray's start-up (distrain/ray_startup.py): an idle dashboard agent
(distrain/idle_agent.py; where it cannot stand in, Ray's own on a free port and minimal), no
dashboard process, no autoscaler monitor, forked workers. End to end, with Ray's default agent
port taken, test_cli's Ctrl-C test shows them on the command's own Ray; the session's Ray here is
started the same way."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import ray
from ray._private import ray_constants, utils
from ray._private.node import Node
from ray._private.parameter import RayParams

from distrain.forked_workers import CLIENT
from distrain.idle_agent import PORT_NAMES
from distrain.ray_startup import (
    IDLE_AGENT,
    _idle_agent_argument,
    embedded_parameters,
    embedded_start,
    minimal_agent,
    no_dashboard_process_unless_asked,
    workers_forked_by,
)
from tests.conftest import REPO, processes_mentioning, reap_processes_mentioning


def test_ray_start_parameters_take_any_free_agent_port_and_no_monitor_only_within() -> None:
    default = RayParams()
    assert default.dashboard_agent_listen_port not in (0, None)  # Ray's fixed port
    assert default.no_monitor is False  # Ray starts an autoscaler monitor with every head
    with embedded_parameters():
        embedded = RayParams()
        assert (embedded.dashboard_agent_listen_port, embedded.no_monitor) == (0, True)
        named = RayParams(dashboard_agent_listen_port=61000, no_monitor=False)
        assert (named.dashboard_agent_listen_port, named.no_monitor) == (61000, False)  # stand
    after = RayParams()
    assert (after.dashboard_agent_listen_port, after.no_monitor) == (
        default.dashboard_agent_listen_port,
        False,
    )


def test_the_dashboard_packages_are_not_imported_to_decide_the_agents_mode_within() -> None:
    with minimal_agent():
        assert isinstance(utils.get_dashboard_dependency_error(), ImportError)  # `--minimal`
    assert utils.get_dashboard_dependency_error() is None  # installed here: Ray's full agent


def test_ray_start_parameters_are_restored_after_an_error() -> None:
    original_init, original_start = RayParams.__init__, Node.start_api_server
    original_probe = utils.get_dashboard_dependency_error
    with pytest.raises(RuntimeError), embedded_start():
        raise RuntimeError("ray.init failed")
    assert RayParams.__init__ is original_init
    assert Node.start_api_server is original_start
    assert utils.get_dashboard_dependency_error is original_probe


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


def test_the_sessions_ray_runs_no_dashboard_nor_monitor_and_an_idle_agent(
    ray_address: str,
) -> None:
    node = ray._private.worker._global_node  # the Ray this process started (conftest)
    assert ray_constants.PROCESS_TYPE_DASHBOARD not in node.all_processes
    assert ray_constants.PROCESS_TYPE_MONITOR not in node.all_processes
    assert ray_constants.PROCESS_TYPE_LOG_MONITOR in node.all_processes  # workers' output: kept
    (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    agent_command = Path(f"/proc/{raylet.process.pid}/cmdline").read_bytes().split(b"\0")
    (agent,) = [part for part in agent_command if part.startswith(b"--dashboard_agent_command=")]
    assert str(IDLE_AGENT).encode() in agent and b"dashboard/agent.py" not in agent, agent
    logs = Path(node.get_logs_dir_path())
    assert not list(logs.glob("dashboard*")), list(logs.glob("dashboard*"))  # neither ran
    assert not list(logs.glob("monitor.*"))
    # The idle agent said none of the agent's services runs; the node registered all the same.
    session = Path(node.get_session_dir_path())
    ports = [session / f"{name}_{node.node_id}" for name in PORT_NAMES]
    assert [port.read_text() for port in ports] == ["-1", "-1", "-1"]
    assert ray.nodes()[0]["Alive"]


def test_the_idle_agent_replaces_only_an_agent_command_it_can_stand_in_for() -> None:
    agent = "/py/python -u /ray/dashboard/agent.py --node-id=ab --session-dir=/s --gcs-address=g"
    (idle,) = _idle_agent_argument(f"--dashboard_agent_command={agent}").split("=", 1)[1:]
    assert shlex.split(idle) == [
        sys.executable, "-S", str(IDLE_AGENT), "--node-id=ab", "--session-dir=/s", "--gcs-address=g"
    ]  # fmt: skip
    unknown = "--dashboard_agent_command=/py/python -u /ray/dashboard/agent.py --node-id=ab"
    assert _idle_agent_argument(unknown) == unknown  # no session dir: Ray's agent, as ever
    assert _idle_agent_argument("--node_ip_address=10.0.0.1") == "--node_ip_address=10.0.0.1"


def test_a_raylet_with_forked_workers_starts_them_behind_the_client_none_ahead_one_more_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The raylet's command as Ray's `start_raylet` makes it, through the patch; Ray's process
    start replaced by one that records the command."""
    from ray._private import services

    started: list[list[str]] = []
    monkeypatch.setattr(
        services, "start_ray_process", lambda command, process_type, **_: started.append(command)
    )
    raylet = [
        "/x/raylet",
        "--python_worker_command=/py/python /ray/setup_worker.py /ray/default_worker.py --a=1",
        "--num_prestart_python_workers=2",
        "--maximum_startup_concurrency=2",
        "--node_ip_address=10.0.0.1",
    ]
    with workers_forked_by("distrain-fork-test"):
        services.start_ray_process(list(raylet), ray_constants.PROCESS_TYPE_RAYLET)
        gcs_type = ray_constants.PROCESS_TYPE_GCS_SERVER
        services.start_ray_process(["/x/gcs_server", "--a=2"], gcs_type)
    services.start_ray_process(list(raylet), ray_constants.PROCESS_TYPE_RAYLET)  # after: as is
    forked, gcs, after = started
    assert forked[0] == "/x/raylet" and forked[-1] == "--node_ip_address=10.0.0.1"
    assert forked[1] == (
        f"--python_worker_command=/py/python -S {CLIENT} distrain-fork-test "
        "/ray/setup_worker.py /ray/default_worker.py --a=1"
    )
    assert forked[2:4] == ["--num_prestart_python_workers=0", "--maximum_startup_concurrency=3"]
    assert gcs == ["/x/gcs_server", "--a=2"] and after == raylet


STARTED_RAY = """
import sys
import ray
from distrain.ray_startup import embedded_start
with embedded_start(fork_server=sys.argv[1]):
    ray.init(address="local", num_cpus=2, include_dashboard=False)
print("up", flush=True)
sys.stdin.read()  # until the test has looked
ray.shutdown()
"""


def _stuck_fork_server(address: str) -> socket.socket:
    """A fork server that takes each request (answers "forked") but never forks: its clients
    wait, as they do for one still importing. In this process: the driver's own threads are
    what `ray.init` would stop."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + address)
    server.listen(64)

    def take_requests() -> None:
        held = []
        with contextlib.suppress(OSError):  # closed: the test is over
            while True:
                client, _ = server.accept()
                held.append(client)
                client.sendall(b"F")

    threading.Thread(target=take_requests, daemon=True).start()
    return server


@pytest.mark.skipif(sys.platform != "linux", reason="the fork server is Linux-only")
def test_ray_init_with_forked_workers_waits_for_no_worker_to_start() -> None:
    """A real Ray in another process, its workers forked by a server whose workers never come:
    `ray.init` returns, no worker started (Ray's prestarted workers would never register, and
    `ray.init` would wait for them inside Ray's CoreWorker constructor, holding the GIL)."""
    address = f"distrain-fork-test-stuck-{uuid.uuid4().hex[:8]}"
    server = _stuck_fork_server(address)
    # The suite turns Ray's first-driver prestart off for its own Rays (conftest.py); this Ray
    # runs as the command's does, and waits for a worker that does not register longer than
    # this test's bound.
    env = {k: v for k, v in os.environ.items() if k != "RAY_prestart_worker_first_driver"}
    env["RAY_worker_register_timeout_seconds"] = "600"
    command = [sys.executable, "-c", STARTED_RAY, address]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    up = threading.Thread(target=process.stdout.readline, daemon=True)  # "up": ray.init returned
    up.start()
    up.join(timeout=60)
    try:
        assert not up.is_alive(), "ray.init waited for workers the fork server never started"
        # No worker was started: no fork client (Ray's worker command) asked the server.
        assert processes_mentioning(f"{CLIENT}\0{address}") == []
        process.communicate(input="", timeout=60)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        server.close()
        assert reap_processes_mentioning(address, timeout_s=10) == []

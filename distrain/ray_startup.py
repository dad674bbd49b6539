"""An embedded Ray that starts in seconds: two of Ray's start-up waits that distrain removes.

* **The dashboard agent's port.** Every Ray node runs a dashboard agent whose HTTP server listens
  on port 52365 unless told otherwise, and `ray.init` has no way to tell it (`ray start
  --dashboard-agent-listen-port` and the nodes `ray.cluster_utils` adds do). Where another Ray
  already runs on the machine (a second job, a sweep's jobs side by side, a `ray start` cluster,
  a test suite), the new agent finds the port taken, retries for 3.4 s and gives up on HTTP, and
  the raylet waits for it before the node joins. Measured on this project's 2-core machine with
  one other Ray running: a head node took 7.2-8.2 s to start, 4.3 s with the agent on a free
  port (Ray issue #14763, open since 2021). So Ray's own start parameters default that port to 0
  (any free port), as Ray already does for the metrics ports and for the nodes cluster_utils
  adds; the agent then records the port it bound.
* **The dashboard process.** `ray.init(include_dashboard=False)` still starts the dashboard's
  process (for its usage-statistics module only) and polls until it has published its address,
  before it starts the raylet: on the critical path of every start. distrain uses no dashboard
  API (no job submission, no state API), so with `include_dashboard=False` that process is not
  started. Measured here: `ray.init` 3.35 s with it, 1.87 s without (three runs each).

Written by hand because no Ray API reaches either; a Ray whose internals differ from what these
patches expect (a parameter or method missing, another signature) is left as it is. Both apply
only within `embedded_start()`, around the `ray.init` that starts a node in this process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

from distrain.forked_workers import client_command

AGENT_PORT_PARAMETER = "dashboard_agent_listen_port"
API_SERVER_PARAMETERS = ["self", "include_dashboard", "raise_on_failure"]


@contextlib.contextmanager
def embedded_start(fork_server: str | None = None) -> Iterator[None]:
    """Within: a Ray node started in this process skips both waits (see the module docstring),
    and its Python workers are forked by the fork server at `fork_server` (forked_workers.py)."""
    forking = workers_forked_by(fork_server) if fork_server else contextlib.nullcontext()
    with agent_on_any_free_port(), no_dashboard_process_unless_asked(), forking:
        yield


@contextlib.contextmanager
def workers_forked_by(address: str) -> Iterator[None]:
    """Within: a raylet started in this process starts its Python workers through the fork
    server at `address` (distrain/forked_workers.py): Ray's worker command, behind its client."""
    try:
        from ray._private import ray_constants, services
    except ImportError:
        yield
        return
    original = getattr(services, "start_ray_process", None)
    if original is None:
        yield
        return

    @functools.wraps(original)
    def start_ray_process(command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        if process_type == ray_constants.PROCESS_TYPE_RAYLET:
            command = [_through_client(part, address) for part in command]
        return original(command, process_type, *args, **kwargs)

    services.start_ray_process = start_ray_process
    try:
        yield
    finally:
        services.start_ray_process = original


def _through_client(part: str, address: str) -> str:
    """A raylet argument; the Python worker command's with the fork server's client in front."""
    flag = "--python_worker_command="
    if not part.startswith(flag):
        return part
    command = shlex.split(part[len(flag) :])
    return flag + subprocess.list2cmdline(client_command(address, command))


@contextlib.contextmanager
def agent_on_any_free_port() -> Iterator[None]:
    """Within: a Ray node started in this process (`ray.init` that starts one) puts its
    dashboard agent on a free port unless the caller names one."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:  # a Ray laid out otherwise: its defaults stand
        yield
        return
    original = RayParams.__init__
    if AGENT_PORT_PARAMETER not in inspect.signature(original).parameters:
        yield
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(AGENT_PORT_PARAMETER, 0)
        original(self, *args, **kwargs)

    RayParams.__init__ = init
    try:
        yield
    finally:
        RayParams.__init__ = original


@contextlib.contextmanager
def no_dashboard_process_unless_asked() -> Iterator[None]:
    """Within: a Ray head started in this process with `include_dashboard=False` starts no
    dashboard process (with True, or None: Ray's default, it starts as ever)."""
    try:
        from ray._private.node import Node
    except ImportError:
        yield
        return
    original = getattr(Node, "start_api_server", None)
    if original is None or list(inspect.signature(original).parameters) != API_SERVER_PARAMETERS:
        yield
        return

    @functools.wraps(original)
    def start_api_server(
        self: Any, *, include_dashboard: bool | None, raise_on_failure: bool
    ) -> None:
        if include_dashboard is False:
            return  # no process to start, none to wait for
        original(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)

    Node.start_api_server = start_api_server
    try:
        yield
    finally:
        Node.start_api_server = original

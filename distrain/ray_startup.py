"""An embedded Ray that starts in seconds: Ray's start-up waits and work that distrain removes.

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
* **Processes that serve only a dashboard or an autoscaler.** On a machine of two cores the
  start is bound by CPU, so whatever else starts beside it costs time. A head node starts an
  autoscaler monitor (a Python process importing Ray: ~0.4 s of CPU), which on one machine has
  nothing to scale: it is not started. Its dashboard agent imports the dashboard's packages
  (aiohttp, OpenTelemetry, Prometheus) to serve a dashboard that does not run, and before
  starting it the driver imports them all to see whether they are installed (~0.2 s of the
  driver's CPU, before `ray.init` returns): the agent starts as Ray starts it where they are
  not installed (`--minimal`), and the driver does not look. Even minimal, the agent is a Python
  importing Ray (~0.9 s of CPU), and the raylet registers its node only once the agent has
  written the ports it serves: an embedded Ray's raylet runs an idle agent in its place
  (distrain/idle_agent.py, a few milliseconds), which says none of them is in use (`idle_agent`).
* **The wait for the node, to the second.** `ray.init` waits for its raylet to register with
  Ray's C++ `GetNode`, which asks the GCS, then sleeps a whole second before it asks again: the
  start is rounded up to the next second after the node registered (1.60 / 2.58 s for `ray.init`
  here, never between). The GCS is asked every `NODE_POLL_S` instead (1.35 / 2.16 s).
* **The driver's wait for prestarted workers.** A raylet prestarts one Python worker per CPU
  for its first driver and answers that driver's registration only once they have all
  registered; `ray.init` waits for the answer inside Ray's CoreWorker constructor, which holds
  the GIL. Forked workers register only once the fork server's imports are done, so the
  driver's check thread, importing torch beside `ray.init`, stood still until then (0.7 s with
  no CPU used, on the CNN bench). With forked workers none are prestarted (the raylet's
  argument: Ray's `prestart_worker_first_driver` setting would reach every raylet this process
  starts): the job's first actors (early_start.py) start them as soon as its settings have
  passed, and the fork server forks each at once, or as soon as its imports are done. Measured
  from the command to the first step, alternating with and without, 8 pairs: CNN 3.37 -> 3.01 s
  (medians).

Written by hand because no Ray API reaches any of these (but the prestart, above: a setting of
Ray's, too wide here); a Ray whose internals differ from what these patches expect (a parameter
or function missing, another signature) is left as it is.
All apply only within `embedded_start()`, around the `ray.init` that starts a node in this
process (with `include_dashboard=False`, as cluster.py starts it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distrain.forked_workers import client_command

# Ray's start parameters (RayParams) that an embedded Ray takes other defaults for.
EMBEDDED_PARAMETERS = {
    "dashboard_agent_listen_port": 0,  # any free port
    "no_monitor": True,  # no autoscaler monitor
}
API_SERVER_PARAMETERS = ["self", "include_dashboard", "raise_on_failure"]
NODE_PARAMETERS = ["gcs_address", "node_id"]
# Forked workers prestarted by the raylet: none (the module docstring says why).
FORKED_PRESTARTED_WORKERS = 0
# A raylet starts at most one Python worker per CPU at a time, as each imports Ray (seconds of
# CPU). A job's first actors are its workers and its metrics sink: one more than that where the
# workers fill the machine, so the sink's process started only once a worker's had registered,
# and the group's start waited for it (~0.25 s on the CNN bench). A forked worker imports
# nothing: one more may start beside the others.
FORKED_EXTRA_WORKERS = 1  # the metrics sink
IDLE_AGENT = Path(__file__).with_name("idle_agent.py")
AGENT_SCRIPT = os.path.join("dashboard", "agent.py")  # Ray's, in its agent's command
AGENT_ARGUMENTS = ("--session-dir", "--node-id")  # what idle_agent.py reads
NODE_POLL_S = 0.02
NODE_WAIT_S = 30.0  # Ray's own bound (its raylet_start_wait_time_s)


@contextlib.contextmanager
def embedded_start(fork_server: str | None = None) -> Iterator[None]:
    """Within: a Ray node started in this process skips Ray's start-up waits and the processes
    it does not need (see the module docstring), and its Python workers are forked by the fork
    server at `fork_server` (forked_workers.py)."""
    forking = workers_forked_by(fork_server) if fork_server else contextlib.nullcontext()
    with (
        embedded_parameters(),
        no_dashboard_process_unless_asked(),
        minimal_agent(),
        idle_agent(),
        node_awaited_closely(),
        forking,
    ):
        yield


def workers_forked_by(address: str) -> contextlib.AbstractContextManager[None]:
    """Within: a raylet started in this process starts its Python workers through the fork
    server at `address` (distrain/forked_workers.py): Ray's worker command, behind its client;
    none ahead of its first actors (`FORKED_PRESTARTED_WORKERS`), one more at a time
    (`FORKED_EXTRA_WORKERS`)."""
    return raylet_arguments(functools.partial(_forked_raylet_argument, address=address))


def raylet_arguments(rewrite: Callable[[str], str]) -> contextlib.AbstractContextManager[None]:
    """Within: each argument of a raylet started in this process is `rewrite(argument)`."""
    try:
        from ray._private import ray_constants, services
    except ImportError:
        return contextlib.nullcontext()

    def replace(original: Callable[..., Any]) -> Callable[..., Any]:
        def start_ray_process(command: list[str], process_type: str, *args: Any, **kw: Any) -> Any:
            if process_type == ray_constants.PROCESS_TYPE_RAYLET:
                command = [rewrite(part) for part in command]
            return original(command, process_type, *args, **kw)

        return start_ray_process

    return _replaced(services, "start_ray_process", replace)


def _forked_raylet_argument(part: str, address: str) -> str:
    """A raylet argument: the Python worker command's with the fork server's client in front,
    no worker prestarted, FORKED_EXTRA_WORKERS more started at a time, the rest as is."""
    flag, _, value = part.partition("=")
    if flag == "--python_worker_command":
        return f"{flag}={subprocess.list2cmdline(client_command(address, shlex.split(value)))}"
    if flag == "--num_prestart_python_workers" and value.isdigit():
        return f"{flag}={FORKED_PRESTARTED_WORKERS}"
    if flag == "--maximum_startup_concurrency" and value.isdigit():
        return f"{flag}={int(value) + FORKED_EXTRA_WORKERS}"
    return part


def idle_agent() -> contextlib.AbstractContextManager[None]:
    """Within: a raylet started in this process runs distrain/idle_agent.py as its dashboard
    agent, with the agent's arguments (Ray's own agent where they are not as expected)."""
    return raylet_arguments(_idle_agent_argument)


def _idle_agent_argument(part: str) -> str:
    """A raylet argument; the dashboard agent's command with idle_agent.py for Ray's agent."""
    flag, _, value = part.partition("=")
    if flag != "--dashboard_agent_command":
        return part
    command = shlex.split(value)
    scripts = [i for i, arg in enumerate(command) if arg.endswith(AGENT_SCRIPT)]
    arguments = command[scripts[0] + 1 :] if scripts else []
    if not all(any(arg.startswith(f"{name}=") for arg in arguments) for name in AGENT_ARGUMENTS):
        return part
    return f"{flag}={subprocess.list2cmdline([sys.executable, '-S', str(IDLE_AGENT), *arguments])}"


def embedded_parameters() -> contextlib.AbstractContextManager[None]:
    """Within: a Ray node started in this process (`ray.init` that starts one) takes
    EMBEDDED_PARAMETERS' values for the parameters its caller does not name."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:  # a Ray laid out otherwise: its defaults stand
        return contextlib.nullcontext()

    def replace(original: Callable[..., None]) -> Callable[..., None]:
        known = inspect.signature(original).parameters
        defaults = {name: value for name, value in EMBEDDED_PARAMETERS.items() if name in known}

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **(defaults | kwargs))

        return init

    return _replaced(RayParams, "__init__", replace)


def minimal_agent() -> contextlib.AbstractContextManager[None]:
    """Within: a raylet started in this process starts its dashboard agent `--minimal`, as Ray
    does where the dashboard's packages are missing, and this process does not import them to
    find out."""
    try:
        from ray._private import utils
    except ImportError:
        return contextlib.nullcontext()

    def replace(_: Callable[[], ImportError | None]) -> Callable[[], ImportError]:
        def get_dashboard_dependency_error() -> ImportError:
            return ImportError("an embedded Ray runs no dashboard (distrain/ray_startup.py)")

        return get_dashboard_dependency_error

    return _replaced(utils, "get_dashboard_dependency_error", replace, parameters=[])


def no_dashboard_process_unless_asked() -> contextlib.AbstractContextManager[None]:
    """Within: a Ray head started in this process with `include_dashboard=False` starts no
    dashboard process (with True, or None: Ray's default, it starts as ever)."""
    try:
        from ray._private.node import Node
    except ImportError:
        return contextlib.nullcontext()

    def replace(original: Callable[..., None]) -> Callable[..., None]:
        def start_api_server(
            self: Any, *, include_dashboard: bool | None, raise_on_failure: bool
        ) -> None:
            if include_dashboard is False:
                return  # no process to start, none to wait for
            original(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)

        return start_api_server

    return _replaced(Node, "start_api_server", replace, API_SERVER_PARAMETERS)


def node_awaited_closely() -> contextlib.AbstractContextManager[None]:
    """Within: `ray.init`, starting a node, waits for it to register by asking the GCS every
    NODE_POLL_S, then takes its record as Ray does (found at once)."""
    try:
        from ray._private import services
        from ray._raylet import GcsClient, NodeID
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest
    except ImportError:
        return contextlib.nullcontext()

    def replace(original: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
        def get_node(gcs_address: str, node_id: str) -> Any:
            with contextlib.suppress(Exception):  # any trouble: Ray's own wait, as ever
                client = GcsClient(address=gcs_address)
                node = NodeID.from_hex(node_id).binary()
                ours = [GetAllNodeInfoRequest.NodeSelector(node_id=node)]
                alive = GcsNodeInfo.GcsNodeState.ALIVE
                deadline = time.monotonic() + NODE_WAIT_S
                while time.monotonic() < deadline:
                    if client.get_all_node_info(timeout=5, node_selectors=ours, state_filter=alive):
                        break
                    time.sleep(NODE_POLL_S)
            return original(gcs_address, node_id)

        return get_node

    return _replaced(services, "get_node", replace, NODE_PARAMETERS)


@contextlib.contextmanager
def _replaced(
    owner: Any,
    name: str,
    replace: Callable[[Callable[..., Any]], Callable[..., Any]],
    parameters: list[str] | None = None,
) -> Iterator[None]:
    """Within: `owner.<name>` is `replace(original)`; left as it is where Ray has no such
    function, or (`parameters` given) one that takes other parameters."""
    original = getattr(owner, name, None)
    if original is None or (
        parameters is not None and list(inspect.signature(original).parameters) != parameters
    ):
        yield
        return
    setattr(owner, name, functools.wraps(original)(replace(original)))
    try:
        yield
    finally:
        setattr(owner, name, original)

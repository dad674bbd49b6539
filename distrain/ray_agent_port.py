"""An embedded Ray's dashboard agent on any free port, so it starts in seconds beside another Ray.

Every Ray node runs a dashboard agent whose HTTP server listens on port 52365 unless told
otherwise, and `ray.init` has no way to tell it (`ray start --dashboard-agent-listen-port` and
the nodes `ray.cluster_utils` adds do). Where another Ray already runs on the machine (a second
job, a sweep's jobs run side by side, a `ray start` cluster, a test suite), the new agent finds
the port taken, retries for 3.4 s and gives up on HTTP, and the raylet waits for it before the
node joins. Measured on this project's 2-core machine with one other Ray running: a head node
took 7.2-8.2 s to start, 4.3 s with the agent on a free port (Ray issue #14763, open since 2021).

So while distrain starts an embedded Ray, Ray's own start parameters default that port to 0
(any free port), as Ray already does for the metrics ports and for the nodes cluster_utils adds;
the agent then records the port it bound. Written by hand because no Ray API reaches this
setting; a Ray whose start parameters have no such field is left as it is.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

AGENT_PORT_PARAMETER = "dashboard_agent_listen_port"


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

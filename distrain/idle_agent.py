"""An embedded Ray node's dashboard agent, idle: it says that none of the agent's services runs,
then waits for the end of its raylet.

Every Ray node runs a dashboard agent, a Python process that imports Ray and serves the
dashboard, the state API's logs, job submission and metrics: ~0.9 s of CPU at every start even
`--minimal`, and the raylet registers its node only once the agent has written the ports it
serves into the session directory. An embedded Ray (a job's own, on its machine) serves none of
those. This script runs in the agent's place (distrain/ray_startup.py, `idle_agent`), with the
agent's arguments, as `python -S`: the standard library only, a few milliseconds. It writes "-1"
for each port, Ray's "not in use" (a minimal agent writes it for its metrics ports), and ends
when the raylet stops it, or when the raylet ends (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PORT_NAMES = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port")
NOT_IN_USE = "-1"


def main(argv: list[str]) -> None:
    options = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the raylet ended before the line above
        return
    for name in PORT_NAMES:  # Ray's port files: <name>_<node id>, written whole
        path = os.path.join(options["session-dir"], f"{name}_{options['node-id']}")
        with open(f"{path}.{os.getpid()}", "w") as port_file:
            port_file.write(NOT_IN_USE)
        os.replace(f"{path}.{os.getpid()}", path)
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])

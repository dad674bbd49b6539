"""The idle dashboard agent (distrain/idle_agent.py), run as a raylet runs it: the ports it
writes, and its end, when it is stopped and when its parent ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrain.idle_agent import PORT_NAMES
from distrain.ray_startup import IDLE_AGENT
from tests.conftest import process_alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
NODE_ID = "ab" * 28


def agent_command(session: Path) -> list[str]:
    # As Ray's agent command ends once the raylet's patch has replaced its script.
    return [sys.executable, "-S", str(IDLE_AGENT), f"--node-id={NODE_ID}",
            "--node-manager-port=RAY_NODE_MANAGER_PORT_PLACEHOLDER",
            f"--session-dir={session}", "--gcs-address=127.0.0.1:1"]  # fmt: skip


def ports(session: Path, timeout_s: float = 30.0) -> list[str]:
    paths = [session / f"{name}_{NODE_ID}" for name in PORT_NAMES]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p.read_text() if p.exists() else "missing" for p in paths]


def test_it_says_no_service_is_in_use_and_waits_until_stopped(tmp_path: Path) -> None:
    agent = subprocess.Popen(agent_command(tmp_path))
    try:
        assert ports(tmp_path) == ["-1", "-1", "-1"]  # Ray's "not in use", as the raylet reads
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            f"{name}_{NODE_ID}" for name in PORT_NAMES
        )  # written whole: no temporary file left
        time.sleep(0.3)
        assert agent.poll() is None  # the raylet's agent lives as long as the raylet
        agent.send_signal(signal.SIGTERM)  # as the raylet stops its agents
        assert agent.wait(timeout=10) == -signal.SIGTERM
    finally:
        if agent.poll() is None:
            agent.kill()


def test_it_ends_with_its_raylet(tmp_path: Path) -> None:
    """A raylet that dies (SIGKILL, say) cannot stop its agent: the agent ends by itself."""
    raylet = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; agent = subprocess.Popen(sys.argv[1:]); "
         "print(agent.pid, flush=True); time.sleep(60)", *agent_command(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    agent_pid = int(raylet.stdout.readline())
    assert ports(tmp_path) == ["-1", "-1", "-1"]
    raylet.kill()
    raylet.wait(timeout=10)
    deadline = time.monotonic() + 10
    while process_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = process_alive(agent_pid)
    if alive:
        os.kill(agent_pid, signal.SIGKILL)
    assert not alive, "the agent outlived its raylet"

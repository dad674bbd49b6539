"""Stacks of hung processes: py-spy on a real stopped process, and where it is stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distrain import hangs

SCRIPT = """
import time
def wait_for_peer():
    while True:
        time.sleep(0.05)
def train():
    wait_for_peer()
print("ready", flush=True)
train()
"""


def test_a_stopped_process_is_dumped_and_located(tmp_path: Path) -> None:
    script = tmp_path / "frozen.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGSTOP)  # frozen: no signal handler of its own would run
        stack = hangs.py_spy_dump(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert "wait_for_peer" in stack and "train" in stack, stack
    frame = hangs.stuck_frame(stack)
    # py-spy shows Python frames only: time.sleep (C) is not one.
    assert frame is not None and frame.startswith("wait_for_peer (frozen.py:"), frame


def test_the_innermost_distrain_frame_is_named() -> None:
    stack = (
        "Process 7: ray::Worker.fit\n\n"
        'Thread 7 (idle): "MainThread"\n'
        "    wait (torch/distributed/distributed_c10d.py:4000)\n"
        "    synchronize (distrain/aggregators/allreduce.py:150)\n"
        "    train_step (distrain/step.py:99)\n"
    )
    assert hangs.stuck_frame(stack) == (
        "wait (torch/distributed/distributed_c10d.py:4000), "
        "called from synchronize (distrain/aggregators/allreduce.py:150)"
    )
    assert hangs.stuck_frame("(no stack for pid 7: py-spy: denied)\n") is None


def test_a_missing_process_says_so() -> None:
    assert hangs.py_spy_dump(2**22 + 12345).startswith("(no stack for pid")


def test_a_node_that_cannot_run_a_task_is_unreachable(ray_address: str) -> None:
    """The probe healing and a hang use: the driver's own node answers; a node whose raylet is
    gone fails the task at once (as a removed node does before Ray declares it dead), and that
    is no answer."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    gone = bytes.fromhex(here)[::-1].hex()  # a well-formed node id no raylet holds
    assert hangs.unreachable({here, gone}, timeout_s=30) == {gone}


def test_stacks_are_not_waited_for_on_a_node_that_misses_the_probe(
    ray_address: str, tmp_path: Path
) -> None:
    """dump_stacks: the rank on a reachable node is dumped; the rank on a node that cannot run
    the probe is named as such, and its node as unreachable."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    gone = bytes.fromhex(here)[::-1].hex()
    script = tmp_path / "frozen.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ranks = [
            {"rank": 0, "node_id": here, "pid": proc.pid},
            {"rank": 1, "node_id": gone, "pid": proc.pid},
        ]
        stacks, lost = hangs.dump_stacks(ranks, tmp_path / "hangs")
    finally:
        proc.kill()
        proc.wait()
    assert lost == {gone}
    assert "wait_for_peer" in stacks[0], stacks[0]
    assert stacks[1] == "(no stack: its node did not run a probe within 5 s)\n"
    assert (tmp_path / "hangs" / "rank1.txt").read_text() == stacks[1]

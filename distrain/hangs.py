"""When a rank is declared hung: every rank's Python stack, written into the run directory.

"Silent for 300 s" says who, not why. The stacks say where each rank is stuck (a collective
waiting for a peer, a data loader, a frozen process). They are read with py-spy (shipped with
ray[default]), which reads a process's memory from outside: it works on a process that is
deadlocked or stopped (SIGSTOP), where a signal handler such as faulthandler's never runs.
Each dump runs on the rank's own node as a zero-CPU Ray task, so it works across a cluster. A
node that does not run a tiny probe task within NODE_PROBE_TIMEOUT_S (a cut link, a frozen
machine) is reported as unreachable and its dump is not waited for; the others' dumps get up to
DUMP_TIMEOUT_S in all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

DUMP_TIMEOUT_S = 10.0
# A node must run a zero-CPU task within this to count as reachable (when a rank is declared
# hung, and before a heal places a replacement beside a failed rank's peers).
NODE_PROBE_TIMEOUT_S = 5.0
FRAME = re.compile(r"^\s+(\S.*) \((\S+):(\d+)\)$")  # py-spy: "    fit (distrain/loop.py:250)"


def py_spy_dump(pid: int, timeout_s: float = DUMP_TIMEOUT_S) -> str:
    """py-spy's dump of every thread of process `pid`, or one line saying why there is none."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        result = subprocess.run(
            [exe, "dump", "--pid", str(pid), "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"(no stack for pid {pid}: {type(error).__name__}: {error})\n"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[0]
        return f"(no stack for pid {pid}: py-spy: {reason})\n"
    return result.stdout


@ray.remote(num_cpus=0)
def _dump_here(pids: list[int]) -> dict[int, str]:
    return {pid: py_spy_dump(pid) for pid in pids}


@ray.remote(num_cpus=0)
def _answer() -> None:
    return None


def _probe(node_ids: set[str]) -> dict[Any, str]:
    return {
        _answer.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote(): node_id
        for node_id in node_ids
    }


def _silent(refs: dict[Any, str], timeout_s: float) -> frozenset[str]:
    """The nodes of the probes `refs` that did not run within `timeout_s`: late, or failed (a
    node whose raylet is gone fails the task at once, before Ray has declared the node dead)."""
    answered, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    failed = []
    for ref in answered:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            failed.append(ref)
    return frozenset(refs[ref] for ref in [*late, *failed])


def unreachable(node_ids: set[str], timeout_s: float = NODE_PROBE_TIMEOUT_S) -> frozenset[str]:
    """The nodes among `node_ids` where a zero-CPU task does not run within `timeout_s`."""
    return _silent(_probe(node_ids), timeout_s)


def dump_stacks(nodes: list[dict[str, Any]], directory: Path) -> tuple[dict[int, str], frozenset]:
    """Every rank's stack as {rank: text}, also written to `directory/rank<r>.txt`, and the ids
    of the nodes that did not answer (unreachable: a cut link, a frozen machine).

    `nodes` are the group's worker records (rank, node_id, node_ip, pid). The other nodes are
    sent a probe just before the dumps: a node whose probe does not run within
    NODE_PROBE_TIMEOUT_S is not waited on for the rest of DUMP_TIMEOUT_S.
    """
    started = time.monotonic()
    by_node: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        by_node.setdefault(node["node_id"], []).append(node)
    probes = _probe(set(by_node) - {ray.get_runtime_context().get_node_id()})
    refs = {
        node_id: _dump_here.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote([w["pid"] for w in workers])
        for node_id, workers in by_node.items()
    }
    silent = _silent(probes, NODE_PROBE_TIMEOUT_S) if probes else frozenset()
    answering = [ref for node_id, ref in refs.items() if node_id not in silent]
    left_s = max(0.0, DUMP_TIMEOUT_S - (time.monotonic() - started))
    ready, _ = ray.wait(answering, num_returns=len(answering), timeout=left_s)
    stacks: dict[int, str] = {}
    for node_id, ref in refs.items():
        try:
            dumps = ray.get(ref) if ref in ready else {}
        except ray.exceptions.RayError as error:
            dumps = {}
            reason = f"the dump on its node failed: {type(error).__name__}"
        else:
            reason = (
                f"its node did not run a probe within {NODE_PROBE_TIMEOUT_S:g} s"
                if node_id in silent
                else f"its node did not answer within {DUMP_TIMEOUT_S:g} s"
            )
        for worker in by_node[node_id]:
            stacks[worker["rank"]] = dumps.get(worker["pid"], f"(no stack: {reason})\n")
        if ref not in ready:
            ray.cancel(ref, force=True)
    directory.mkdir(parents=True, exist_ok=True)
    for rank, text in stacks.items():
        (directory / f"rank{rank}.txt").write_text(text)
    return stacks, frozenset(node_id for node_id, ref in refs.items() if ref not in ready)


def stuck_frame(stack: str) -> str | None:
    """Where a rank is: the innermost distrain frame of its training thread (or the innermost
    frame of the first thread when no distrain code is on any stack), as `function (file:line)`.
    """
    threads: list[list[str]] = []
    for line in stack.splitlines():
        if line.startswith("Thread "):
            threads.append([])
        elif threads and FRAME.match(line):
            threads[-1].append(line.strip())
    for frames in threads:
        ours = [f for f in frames if "distrain/" in f or "distrain\\" in f]
        if ours:
            return ours[0] if ours[0] == frames[0] else f"{frames[0]}, called from {ours[0]}"
    return threads[0][0] if threads and threads[0] else None

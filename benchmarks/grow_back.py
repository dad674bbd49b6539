"""Growing back, side by side in one run: an elastic job (2 workers, `trainer.min_workers=1`,
one per node) on a two-node Ray cluster loses its second node, goes on with one worker, and grows
back to two when a node joins: in place (its worker kept, a new one takes the state from memory;
the default where failures heal in place) and from a checkpoint (`trainer.heal=false`, the path
GPU and sharded-state jobs take: every worker new, at the next checkpoint boundary). With each,
how far the final parameters are from an uninterrupted run's (the same global batch: equal up
to the order of float sums).

    python benchmarks/grow_back.py [--rounds 2] [--out results/grow_back_latest.md]   # ~3 min

The two nodes are Ray processes on this machine (`ray.cluster_utils.Cluster`, one CPU each):
removing one ends its processes at once, as a lost host would be seen. Rank 0 sleeps 60 ms a
step in every run (the result does not change), so that a node has time to join.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, from anywhere
from benchmarks.recovery import max_difference
from distrain.simulate import SLOW_RANK_ENV

JOB = [
    "trainer.epochs=12",
    "trainer.checkpoint_every_n_steps=10",
    "model.hidden_sizes=[64,64]",
    "optimizer.lr=0.05",
    "logger.progress=plain",  # the line that says the run went on with one worker
    "logger.log_every_n_steps=1",  # the first step after the grow back is seen as it completes
    "trainer.workers=2",
    "cluster.placement=STRICT_SPREAD",
    "cluster.connect_timeout_s=5",
]
MODES = {"in place": [], "from a checkpoint": ["trainer.heal=false"]}
# Ray gives up on a lost node after 3 missed health checks a second apart (default: 30 s).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


def run(cluster: Cluster, run_dir: Path, *overrides: str, lose_a_node: bool) -> dict:
    """The job on the cluster (its second node lost after the first checkpoint, then a new one
    added once the run goes on with one worker); its metrics.json."""
    cli = [sys.executable, "-m", "distrain", *JOB, f"cluster.address={cluster.address}"]
    if lose_a_node:
        cli.append("trainer.min_workers=1")
    proc = subprocess.Popen(
        [*cli, *overrides, f"hydra.run.dir={run_dir}"], stderr=subprocess.PIPE, text=True
    )
    try:
        if lose_a_node:
            while not (run_dir / "checkpoints" / "latest").exists():
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                time.sleep(0.05)
            cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
            for line in proc.stderr:  # until it goes on with one worker
                if "elastic: continuing on 1 of 2 workers" in line:
                    break
            cluster.add_node(num_cpus=1)  # capacity is back
        stderr = proc.communicate(timeout=600)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distrain-grow-back-"))
    os.environ[SLOW_RANK_ENV] = "0:0.06"  # every run below
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "_system_config": FAST_NODE_DEATH,
            "dashboard_agent_listen_port": 0,  # not a default port another Ray may hold
        },
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run(cluster, work / "reference", lose_a_node=False)
        expected = torch.load(work / "reference" / "model.pt", weights_only=True)
        figures: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):  # interleaved: the machine's noise falls on both
            for mode, overrides in MODES.items():
                run_dir = work / f"{mode.replace(' ', '-')}-{round_}"
                grow_back = run(cluster, run_dir, *overrides, lose_a_node=True)["grow_backs"][0]
                figures[mode].append({**grow_back, "max_diff": max_difference(run_dir, expected)})
        print("\n".join(lines := report(figures, args.rounds)))
        if args.out:
            args.out.write_text("# Growing back\n\n```\n" + "\n".join(lines) + "\n```\n")
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def report(figures: dict[str, list[dict]], rounds: int) -> list[str]:
    lines = [
        f"an elastic run back from 1 to 2 workers when a node joins, median of {rounds} (seconds):",
        f"  {'':18} {'downtime':>9}  {'max |diff|':>10}  runs (downtime s, step)",
    ]
    for mode, runs in figures.items():
        each = ", ".join(f"{r['downtime_s']:.2f} at {r['step']}" for r in runs)
        lines.append(
            f"  {mode:18} {statistics.median(r['downtime_s'] for r in runs):9.2f}  "
            f"{max(r['max_diff'] for r in runs):10.3g}  {each}"
        )
    phases = [r["phases_s"] for r in figures["in place"]]
    split = ", ".join(
        f"{k.removesuffix('_s')} {statistics.median(p[k] for p in phases):.2f}" for k in phases[0]
    )
    ready = statistics.median(r["new_workers_ready_s"] for r in figures["in place"])
    lines.append(f"  in place, by phase (median): {split}")
    lines.append(
        f"  in place: the new worker started in {ready:.2f} s (median) while one trained on"
    )
    in_place, restart = (
        statistics.median(r["downtime_s"] for r in runs) for runs in figures.values()
    )
    lines.append(f"  in place: downtime {in_place / restart:.2f}x the checkpoint path's")
    lines.append(
        "  downtime: the last step before the group stopped -> the first step after it grew "
        "(as the driver received them)"
    )
    return lines


if __name__ == "__main__":
    main()

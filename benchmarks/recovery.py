"""Fault-tolerance figures, side by side in one run: a worker SIGKILLed mid-run and the time until
training goes on, healed in place with a warm spare, healed without one (the default: the
survivor trains on alone while a new worker starts, then the group grows back; and
`trainer.train_while_replacing=false`: the survivor waits for it), and restarted from the last
checkpoint (`trainer.heal=false`, every worker new); with each, how far the final parameters are
from an uninterrupted run's, and the run's wall time beyond an uninterrupted run of the same
round (the work the failure cost, whatever form the recovery took). Also the checkpoint's size
and write time.

    python benchmarks/recovery.py [--rounds 2] [--out results/recovery_latest.md]   # ~4 min

`make bench` runs it last (results/recovery_latest.md).

One embedded Ray (4 logical CPUs) for everything; each faulted run goes through the real CLI
joined to it, and rank 1 is killed with SIGKILL by pid once the first checkpoint is written (and,
with a spare, once the spare is warm). Rank 0 sleeps 20 ms a step in every run (the result does
not change): the runs last long enough for a spare to warm up on two busy cores. That sleep
hides most of what training alone costs the survivor (its steps' compute doubles, the sleep does
not): the report adds the bound for a compute-bound job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from distrain import checkpoint, driver
from distrain.checkpoint import CheckpointStore
from distrain.cli import compose_job
from distrain.rundir import RunDirectory
from distrain.simulate import SLOW_RANK_ENV

JOB = [
    "trainer.epochs=20",
    "trainer.checkpoint_every_n_steps=10",
    "logger.progress=none",
    "logger.log_every_n_steps=1",  # the first step after the failure is seen as it completes
    "model.dropout=0.2",  # the result depends on each rank's random stream
]
# A heal's recovery, in order (distrain/healing.py): the survivors leave the broken step, one
# captures the training state, the replacements start, the new group forms and takes the state.
HEAL_PHASES = ("survivors_stopped_s", "state_captured_s", "replacements_started_s", "rejoined_s")
MODES = {
    "healed, warm spare": ["trainer.spare_workers=1"],
    "healed, no spare": [],  # the survivor trains on while the new worker starts
    "healed, no spare, waiting": ["trainer.train_while_replacing=false"],
    "restarted from checkpoint": ["trainer.heal=false"],
}
HEALED = ("healed, warm spare", "healed, no spare", "healed, no spare, waiting")
UNINTERRUPTED = "uninterrupted"  # each round's baseline for the wall time a failure cost


def faulted_run(run_dir: Path, address: str, overrides: list[str], kill: bool = True) -> dict:
    """The job with rank 1 SIGKILLed after the first checkpoint (or not); its metrics.json."""
    cli = [sys.executable, "-m", "distrain", *JOB, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([*cli, f"cluster.address={address}"], stderr=subprocess.PIPE, text=True)
    spare = any("spare_workers" in o for o in overrides)

    def ready() -> bool:
        if not (run_dir / "checkpoints" / "latest").exists():
            return False
        workers = json.loads((run_dir / "workers.json").read_text())
        return bool(workers.get("spares")) or not spare

    while kill and not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    if kill:
        pid = json.loads((run_dir / "workers.json").read_text())["workers"][1]["pid"]
        os.kill(pid, signal.SIGKILL)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def max_difference(run_dir: Path, expected: dict) -> float:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    return max((final[k] - expected[k]).abs().max().item() for k in expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()
    rounds, lines = args.rounds, []
    work = Path(tempfile.mkdtemp(prefix="distrain-recovery-"))
    os.environ[SLOW_RANK_ENV] = "0:0.02"  # every run below, the faulted ones' CLI included
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        reference = RunDirectory(work / "reference")
        driver.train(compose_job(*JOB), reference)
        expected = torch.load(reference.model_path, weights_only=True)
        lines += report_checkpoint(reference)
        address = ray.get_runtime_context().gcs_address
        figures: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_ in range(rounds):  # interleaved: the machine's noise falls on every mode
            baseline = faulted_run(work / f"uninterrupted-{round_}", address, [], kill=False)
            for mode, overrides in MODES.items():
                run_dir = work / f"{mode.replace(' ', '-').replace(',', '')}-{round_}"
                metrics = faulted_run(run_dir, address, overrides)
                figures[mode].append(
                    {
                        **metrics["failures"][0],
                        "grow_backs": metrics["grow_backs"],
                        "lost_s": metrics["wall_s"] - baseline["wall_s"],
                        "max_diff": max_difference(run_dir, expected),
                    }
                )
        lines += report_kills(figures, rounds)
        print("\n".join(lines))
        if args.out:
            args.out.write_text("# Recovery\n\n```\n" + "\n".join(lines) + "\n```\n")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the runs, checkpoints included; the report is out


def report_kills(figures: dict[str, list[dict]], rounds: int) -> list[str]:
    lines = [f"SIGKILLed worker, median of {rounds} (seconds):"]
    header = f"  {'':27} {'detection':>9} {'recovery':>9} {'downtime':>9} {'run lost':>9}"
    lines.append(header + "  max |diff|")
    for mode, runs in figures.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
        diff = max(r["max_diff"] for r in runs)
        lines.append(
            f"  {mode:27} {median['detection_s']:9.2f} {median['recovery_s']:9.2f} "
            f"{median['downtime_s']:9.2f} {median['lost_s']:9.2f}  {diff:.3g}"
        )
    for mode in HEALED:  # where a heal's time went
        phases = [r["healed"]["phases_s"] for r in figures[mode] if "healed" in r]
        if phases:
            split = ", ".join(
                f"{k.removesuffix('_s')} {statistics.median(p[k] for p in phases):.2f}"
                for k in HEAL_PHASES
            )
            lines.append(f"  {mode}, recovery by phase (median): {split}")
    restart = figures["restarted from checkpoint"]
    grown = [r["grow_backs"][0] for r in figures["healed, no spare"] if r["grow_backs"]]
    if grown:
        ready = statistics.median(g["new_workers_ready_s"] for g in grown)
        pause = statistics.median(g["downtime_s"] for g in grown)
        lines.append(
            f"  healed, no spare: {len(grown)}/{rounds} grew back to 2 workers; the new worker "
            f"took {ready:.2f} s to start while the survivor trained alone, then the grow "
            f"back's pause: {pause:.2f} s (median)"
        )
        # Rank 0 sleeps 20 ms a step, so its steps alone cost it only its extra compute: on a
        # compute-bound job they take up to twice as long, up to ready / 2 more run time lost.
        bound = statistics.median(r["lost_s"] for r in figures["healed, no spare"]) + ready / 2
        restart_lost = statistics.median(r["lost_s"] for r in restart)
        lines.append(
            f"  healed, no spare, if compute-bound (steps alone twice as long while the new "
            f"worker starts): run time lost up to {bound:.2f} s, {bound / restart_lost:.2f}x "
            "the checkpoint restart's"
        )
    for mode in HEALED:
        for key, what in (("downtime_s", "downtime"), ("lost_s", "run time lost")):
            ratio = statistics.median(r[key] for r in figures[mode]) / statistics.median(
                r[key] for r in restart
            )
            lines.append(f"  {mode}: {what} {ratio:.2f}x the checkpoint restart's")
    lines.append(
        "  detection: last step before the kill -> failure noticed; recovery: noticed -> "
        "group training again; downtime: last step before -> first step after; run lost: the "
        "run's wall time minus that of an uninterrupted run in the same round"
    )
    return lines


def report_checkpoint(reference: RunDirectory) -> list[str]:
    latest = checkpoint.load(CheckpointStore(reference.checkpoints, keep=3).latest())
    shards = [read() for read in latest.shards]
    store = CheckpointStore(reference.path / "timing", keep=1)
    write_s = []
    for _ in range(5):
        started = time.perf_counter()
        store.save(latest.meta, [lambda shard=shard: shard for shard in shards])
        write_s.append(time.perf_counter() - started)
    # A checkpoint is a directory: the JSON index and one safetensors shard per rank.
    size_mb = sum(f.stat().st_size for f in latest.path.iterdir()) / 1e6
    return [
        f"checkpoint: {size_mb:.2f} MB ({latest.path.name}, {len(shards)} shards)",
        f"checkpoint write: median {statistics.median(write_s) * 1e3:.1f} ms over 5",
    ]


if __name__ == "__main__":
    main()

"""DDP, ZeRO-1 and FSDP side by side on the ~6M MLP and the GPT: speed, memory, checkpoints.

    python benchmarks/large_models.py [--repeats 2] [--workers 2] [--workloads mlp6m,gpt]

Each row is one distrain run in a fresh process (`--one`), on `--workers` workers, Adam(W), a
checkpoint every `CHECKPOINT_EVERY` steps. The rows run in alternating rounds (every row once,
then again), so all see similar load; the report gives each figure's median over the rounds
and its min-max spread. Figures come from the run's own metrics.json and TensorBoard files:

* steady samples/s (tokens/s for the GPT): the logged intervals after the warm-up steps;
* per-worker state: parameters + gradients + optimizer state held by the worker (its shards
  under FSDP), the largest over the workers; peak memory (RSS on a CPU) likewise;
* checkpoints: the seconds a step blocked per checkpoint (copy to host memory; with
  `trainer.async_checkpoint=false` the write too), the driver's write time, the size on disk.

Targets (issue #13): FSDP's per-worker state <= 0.55x DDP's; FSDP's throughput >= 0.8x DDP's;
an asynchronous checkpoint blocks the step for <= 0.2x a synchronous one. `compile` is reported
against eager without a target. Writes results/large_latest.md and .jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
WARMUP, MEASURE, CHECKPOINT_EVERY = 10, 30, 10
STRATEGIES = {
    "DDP": ["aggregator=allreduce"],
    "ZeRO-1": ["aggregator=allreduce", "trainer.shard_optimizer=true"],
    "FSDP": ["aggregator=fsdp"],
    "FSDP, sync checkpoints": ["aggregator=fsdp", "trainer.async_checkpoint=false"],
    "DDP + compile": ["aggregator=allreduce", "trainer.compile=true"],
}
ROWS = {
    "mlp6m": list(STRATEGIES),
    "gpt": ["DDP", "ZeRO-1", "FSDP"],
}
TARGETS = (  # (what, row, reference row, key, bound, higher is better)
    ("FSDP per-worker state", "FSDP", "DDP", "state_mb", 0.55, False),
    ("FSDP throughput", "FSDP", "DDP", "rate", 0.8, True),
    ("async checkpoint blocking", "FSDP", "FSDP, sync checkpoints", "blocking_s", 0.2, False),
)


def one(workload: str, strategy: str, workers: int) -> dict[str, Any]:
    """One run in this (fresh) process; its figures."""
    from benchmarks.distrain_bench import steady_samples_per_s
    from benchmarks.lm_bench import LM, lm_overrides, token_dir
    from benchmarks.workload_specs import SPECS, job_overrides
    from distrain import driver
    from distrain.cli import compose_job
    from distrain.rundir import RunDirectory

    steps = WARMUP + MEASURE
    common = [
        *STRATEGIES[strategy],
        f"trainer.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
        "logger.progress=none",
        "logger.log_every_n_steps=5",
    ]
    if workload == "gpt":
        data = token_dir()
        job = compose_job(*lm_overrides(data, workers, steps), *common)
        global_batch, per_sample = LM.batch_per_worker * workers, LM.block_size
        steps_per_epoch = (os.path.getsize(data / "train.bin") - 1) // per_sample // global_batch
    else:
        spec = SPECS[workload]
        global_batch, per_sample = spec.batch_per_worker * workers, 1
        steps_per_epoch = spec.train_samples // global_batch
        epochs = -(-steps // steps_per_epoch)
        job = compose_job(
            *common,
            f"trainer.workers={workers}",
            f"trainer.epochs={epochs}",
            f"trainer.max_steps={steps}",
        )
        job.update(job_overrides(workload, 0))
        job["data"]["batch_size"] = global_batch
        job["optimizer"] = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = driver.train(job, RunDirectory(Path(tmp)))
        rate, _ = steady_samples_per_s(
            Path(tmp), warmup=WARMUP, steps_per_epoch=steps_per_epoch, global_batch=global_batch
        )
    ranks, saved = metrics["aggregator"], metrics["checkpoints"]
    state = [r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_state_bytes"] for r in ranks]
    return {
        "rate": rate * per_sample,
        "state_mb": max(state) / 1e6,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ranks),
        "blocking_s": statistics.mean(r["checkpoint_blocking_s"] for r in ranks) / saved["saved"],
        "write_s": statistics.median(saved["write_s"]),
        "checkpoint_mb": saved["size_bytes"] / 1e6,
        "compile_s": max(r.get("compile_s", 0.0) for r in ranks),
    }


def _child(workload: str, strategy: str, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", workload, strategy, "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{workload} {strategy} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _median(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def report(runs: dict[tuple[str, str], list[dict[str, Any]]], workers: int, info: str) -> str:
    lines = [
        f"# Large models: DDP, ZeRO-1, FSDP on {workers} workers",
        "",
        info,
        "",
        "Median of the rounds, [min–max] where runs differ by more than 5 %.",
    ]
    for workload in ROWS:
        found = [(s, runs[(workload, s)]) for s in ROWS[workload] if (workload, s) in runs]
        if not found:
            continue
        unit = "tokens/s" if workload == "gpt" else "samples/s"
        lines += [
            "",
            f"## {workload}",
            "",
            f"| strategy | steady {unit} | state per worker (MB) | peak RSS (MB) "
            "| step blocked per checkpoint (s) | write (s) | checkpoint (MB) | compile (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for strategy, rows in found:
            cells = []
            for key, fmt in (
                ("rate", "{:,.0f}"),
                ("state_mb", "{:.1f}"),
                ("peak_memory_mb", "{:,.0f}"),
                ("blocking_s", "{:.3f}"),
                ("write_s", "{:.3f}"),
                ("checkpoint_mb", "{:.1f}"),
                ("compile_s", "{:.1f}"),
            ):
                mid, low, high = _median(rows, key)
                spread = f" [{fmt.format(low)}–{fmt.format(high)}]" if high > 1.05 * low else ""
                cells.append(fmt.format(mid) + spread)
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines += ["", *_verdicts(runs, workload)]
    return "\n".join(lines) + "\n"


def _verdicts(runs: dict[tuple[str, str], list[dict[str, Any]]], workload: str) -> list[str]:
    """Each target as the ratio of medians, with the range of the per-round ratios."""
    out = []
    for what, row, reference, key, bound, higher in TARGETS:
        mine, theirs = runs.get((workload, row)), runs.get((workload, reference))
        if not mine or not theirs:
            continue
        ratio = _median(mine, key)[0] / _median(theirs, key)[0]
        rounds = [a[key] / b[key] for a, b in zip(mine, theirs)]
        met = (ratio >= bound) if higher else (ratio <= bound)
        straddles = min(rounds) < bound < max(rounds)
        verdict = "within the spread" if straddles else ("met" if met else "NOT met")
        sign = ">=" if higher else "<="
        out.append(
            f"* {workload}: {what}, {row} / {reference} = **{ratio:.2f}×** "
            f"(rounds {min(rounds):.2f}–{max(rounds):.2f}; target {sign} {bound}×: {verdict})"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    p.add_argument("--workloads", default=",".join(ROWS))
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "STRATEGY"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "large_latest")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.workers)))
        return
    started, load = time.time(), os.getloadavg()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(args.repeats):
        for workload in args.workloads.split(","):
            for strategy in ROWS[workload]:
                print(f"large models: {workload} {strategy} (round {round_ + 1})", file=sys.stderr)
                row = _child(workload, strategy, args.workers)
                runs.setdefault((workload, strategy), []).append(row)
    info = (
        f"{args.repeats} alternating rounds, {WARMUP} warm-up + {MEASURE} measured steps, a "
        f"checkpoint every {CHECKPOINT_EVERY} steps; {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{(time.time() - started) / 60:.1f} min. Written by benchmarks/large_models.py."
    )
    text = report(runs, args.workers, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    rows = [{"workload": w, "strategy": s, "runs": r} for (w, s), r in runs.items()]
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text)


if __name__ == "__main__":
    main()

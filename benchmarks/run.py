"""distrain side by side with the peer baselines; writes results/latest.md, .jsonl and .png.

    make bench                                   # everything (~15 min on 2 cores)
    make bench ARGS='--repeats 2'                # the parameter-server pair twice (~17 min)
    make bench ARGS='--workloads digits_mlp --skip-compression'

Per workload, every system runs back to back in a fresh process (so load on a shared machine
drifts as little as possible between them): the single-process peers with 1 worker, the
multi-process peers with `--workers` (2), and distrain's allreduce with 1 and 2 workers (2 both
through shared memory, its default on one node, and through gloo) and its parameter server
(2 servers, sync and async) with 2, always at the workload's batch per worker.
With `--repeats N` the pair behind the parameter-server target (Ray's docs PS and distrain's
sync PS) runs N times in all, alternating, and the fastest run of each is kept: on a shared
machine one run can be slowed several-fold by someone else's job.
Then digits with fp16/bf16 gradient compression against none: bytes all-reduced per step, as
counted by distrain's communication hooks, and validation accuracy after the default job.
Last, the LM workload (benchmarks/lm_bench.py: a byte-level GPT against nanoGPT's loop and
torchrun DDP of it, with MFU), unless --skip-lm.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks.peers.launch import run_peer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Steps measured after warm-up: digits steps are ~1 ms, so 100 would time a tenth of a second.
MEASURE_STEPS = {"digits_mlp": 600, "mlp6m": 40, "cnn": 40}
SINGLE_PROCESS_PEERS = ("textbook", "inmemory")
MULTI_PROCESS_PEERS = ("torchrun_ddp", "ray_train", "ray_ps")
DISTRAIN = (
    ("allreduce", 1),
    ("allreduce", "W"),  # shared memory between the workers (aggregator.transport=auto)
    ("allreduce_gloo", "W"),  # the same over gloo, as torchrun and Ray Train communicate
    ("ps_sync", "W"),
    ("ps_async", "W"),
)
COMPRESSIONS = ("none", "fp16", "bf16")
PS_PEER = "ray_ps"  # the single-actor parameter server of Ray's docs


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _json_line(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=REPO
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def run_distrain(strategy: str, *, timeout_s: float = 600, **options: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "distrain_bench.py"), "--strategy", strategy]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return _json_line([*cmd, "--t0", repr(time.time())], timeout_s)


def run_compression(compression: str, workers: int, timeout_s: float = 600) -> dict[str, Any]:
    """The default job (digits MLP, 10 epochs) through the CLI; figures from its metrics.json."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            *(sys.executable, "-m", "distrain"),
            f"aggregator.compression={compression}",
            f"trainer.workers={workers}",
            "logger.progress=none",
            f"hydra.run.dir={tmp}",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=REPO
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    return {
        "compression": compression,
        "bytes_per_step": metrics["aggregator"][0]["allreduce_payload_bytes_per_step"],
        "val_accuracy": metrics["val_accuracy"],
        "samples_per_s": metrics["samples_per_s"],
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (the least disturbed by other load), with all rates."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    best = max(done, key=lambda r: r["samples_per_s"])
    if len(runs) > 1:
        best = {**best, "samples_per_s_runs": [r.get("samples_per_s") for r in runs]}
    return best


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    revision = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "git": revision,
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workloads", default=",".join(MEASURE_STEPS))
    p.add_argument("--workers", type=int, default=2, help="for the multi-worker systems")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of ray_ps and distrain ps_sync, alternating (best kept); 2 adds ~3 min",
    )
    p.add_argument("--skip-peers", action="store_true", help="distrain only")
    p.add_argument("--skip-compression", action="store_true")
    p.add_argument("--skip-lm", action="store_true", help="no LM workload (benchmarks/lm_bench.py)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest")
    args = p.parse_args()
    started, info = time.time(), machine()
    rows: list[dict[str, Any]] = []
    for workload in args.workloads.split(","):
        steps = {"warmup_steps": args.warmup_steps, "measure_steps": MEASURE_STEPS[workload]}
        jobs: list[tuple[str, str, int]] = []
        if not args.skip_peers:
            jobs += [("peer", name, 1) for name in SINGLE_PROCESS_PEERS]
            jobs += [("peer", name, args.workers) for name in MULTI_PROCESS_PEERS]
        jobs += [("distrain", s, args.workers if w == "W" else w) for s, w in DISTRAIN]
        # The parameter-server target pair again, alternating, so both see the same load.
        pair = [("peer", PS_PEER, args.workers), ("distrain", "ps_sync", args.workers)]
        jobs += pair * (args.repeats - 1) if not args.skip_peers else []
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for kind, name, workers in jobs:
            print(f"{workload}: {name} x{workers} ...", file=sys.stderr, flush=True)
            try:
                if kind == "peer":
                    row = run_peer(name, workload=workload, workers=workers, **steps)
                else:
                    row = run_distrain(name, workload=workload, workers=workers, **steps)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                row = {"name": name, "workload": workload, "workers": workers, "error": str(error)}
            runs.setdefault((name, workers), []).append(row)
        rows += [_best(repeated) for repeated in runs.values()]
    compression = []
    if not args.skip_compression:
        for name in COMPRESSIONS:
            print(f"digits default job: compression={name} ...", file=sys.stderr, flush=True)
            compression.append(run_compression(name, args.workers))
    info["load_average_at_end"] = os.getloadavg()
    info["total_s"] = time.time() - started
    info["repeats"] = args.repeats
    from benchmarks.report import write_report  # matplotlib only for the report

    write_report(args.out, rows, compression, info, workers=args.workers)
    print(f"wrote {args.out}.md, {args.out}.png, {args.out}.jsonl", file=sys.stderr)
    if not args.skip_lm:  # a GPT on a token file: its own table, results/lm_latest.md
        lm = [sys.executable, str(REPO / "benchmarks" / "lm_bench.py"), "--workers"]
        subprocess.run([*lm, str(args.workers)], check=True, env=_env(), cwd=REPO)


if __name__ == "__main__":
    main()

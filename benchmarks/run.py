"""distrain side by side with the peer baselines; writes results/latest.md, .jsonl and .png.

    make bench                                          # everything (~20 min on 2 quiet cores)
    make bench ARGS='--repeats 5 --ps-repeats 5'        # more rounds: tighter medians, longer
    make bench ARGS='--workloads digits_mlp --repeats 2 --skip-compression --skip-lm --out /tmp/b'
    make bench ARGS='--only inmemory,distrain_allreduce:1 --skip-compression --skip-lm --out /tmp/b'

Every run is a fresh process. The two sides of each target pair run alternately, A B A B ...:
per workload, `--repeats` rounds (default 3) of

    inmemory x1, distrain allreduce x1             target >= 0.95x
    torchrun DDP xW, distrain allreduce xW         target >= 1.0x
    textbook x1 (digits only)                      distrain allreduce xW >= 1.0x it
    Ray docs PS xW, distrain parameter_server xW   target >= 2.0x (first `--ps-repeats` rounds)

so a slow minute on a shared machine hits both sides of a pair alike. Ray Train (targets:
throughput >= 1.0x, time to first step <= 0.5x) runs once, in the first round; the `--extras`
(distrain allreduce over gloo, async PS) too, when asked for. The report gives every row's
median and min-max over its runs, and every target as the ratio of medians with the range of
the per-round ratios (round i's A over round i's B): a target inside that range is "within the
spread (undecided)", not met or missed. A run is mostly start-up (Ray, imports: 5-25 s), so rows
measure few steps (MEASURE_STEPS) and the rounds are what buys precision.
Then digits with fp16/bf16 gradient compression against none (bytes all-reduced per step, as
counted by distrain's communication hooks, and validation accuracy after the default job), and
then the LM workload (benchmarks/lm_bench.py, `--lm-repeats` rounds: a byte-level GPT against
nanoGPT's loop and torchrun DDP of it, with MFU; results/lm_latest.md), and last DDP, ZeRO-1
and FSDP on the ~6M MLP and the GPT (benchmarks/large_models.py, `--large-repeats` rounds (1):
speed, per-worker state and memory, checkpoint blocking/write time and size;
results/large_latest.md), and last of all a killed worker healed with a warm spare, healed
without one (the survivor training on, or waiting) and restarted from a checkpoint
(benchmarks/recovery.py, results/recovery_latest.md),
then an elastic run growing back in place and from a checkpoint (benchmarks/grow_back.py,
results/grow_back_latest.md).

Options: `--workloads` (comma list of digits_mlp, mlp6m, cnn), `--workers` (2, for the
multi-worker systems), `--repeats` (3), `--ps-repeats` (2: the PS target is missed far outside
its spread, and each PS run costs ~45 s), `--warmup-steps` (20), `--measure-steps`
(`digits_mlp=1200,cnn=60`: per-workload overrides), `--only NAME[:WORKERS],...` (just these
systems, e.g. `inmemory,distrain_allreduce:1`), `--extras allreduce_gloo,ps_async`,
`--skip-peers` (distrain only), `--skip-others` (no Ray Train), `--skip-compression`,
`--skip-lm`, `--lm-repeats` (1), `--skip-large`, `--large-repeats` (1), `--skip-recovery`,
`--recovery-rounds` (2: benchmarks/recovery.py, results/recovery_latest.md), `--skip-grow-back`,
`--out PATH`
(default results/latest; pass /tmp/... for trial runs, so the committed report stays a full
run).
"""

import argparse
import importlib.util
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
# Steps measured after warm-up: 1-2 s each. A run is mostly start-up (Ray, imports), so longer
# windows cost little, and they average out bursts of other load (digits steps are ~0.7 ms).
MEASURE_STEPS = {"digits_mlp": 2000, "mlp6m": 40, "cnn": 60}
W = "W"  # stands for --workers
# One round: the target pairs, each pair back to back (A then B).
ROUND: tuple[tuple[str, str, int | str], ...] = (
    ("peer", "inmemory", 1),
    ("distrain", "allreduce", 1),
    ("peer", "torchrun_ddp", W),
    ("distrain", "allreduce", W),  # shared memory between the workers (transport=auto)
    ("peer", "textbook", 1),  # digits only: 2 workers must beat the single process
)
PS_PAIR: tuple[tuple[str, str, int | str], ...] = (
    ("peer", "ray_ps", W),  # the single-actor parameter server of Ray's docs
    ("distrain", "ps_sync", W),
)
# Rows that are no pair's: once, in the first round. Ray Train has targets against allreduce xW.
ONCE: tuple[tuple[str, str, int | str], ...] = (("peer", "ray_train", W),)
EXTRAS = {  # --extras: distrain rows without a target, once, in the first round
    "allreduce_gloo": ("distrain", "allreduce_gloo", W),  # as allreduce xW, over gloo
    "ps_async": ("distrain", "ps_async", W),
}
TEXTBOOK_WORKLOADS = ("digits_mlp",)
COMPRESSIONS = ("none", "fp16", "bf16")


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


def row_name(kind: str, name: str) -> str:
    return f"distrain_{name}" if kind == "distrain" else name


def _wanted(only: str | None, name: str, workers: int) -> bool:
    if not only:
        return True
    return any(want in (name, f"{name}:{workers}") for want in only.split(","))


def schedule(args: argparse.Namespace, workload: str) -> list[tuple[int, str, str, int]]:
    """(round, kind, name, workers) in run order: `repeats` rounds, the one-off rows in round 0."""
    jobs = []
    for round_ in range(max(args.repeats, args.ps_repeats)):
        systems = ROUND if round_ < args.repeats else ()
        systems += PS_PAIR if round_ < args.ps_repeats else ()
        if round_ == 0:
            systems += () if args.skip_others else ONCE
            systems += tuple(EXTRAS[name] for name in filter(None, args.extras.split(",")))
        for kind, name, workers in systems:
            n = args.workers if workers == W else int(workers)
            if name == "textbook" and workload not in TEXTBOOK_WORKLOADS:
                continue
            if (kind == "peer" and args.skip_peers) or not _wanted(
                args.only, row_name(kind, name), n
            ):
                continue
            jobs.append((round_, kind, name, n))
    return jobs


def run_one(kind: str, name: str, workload: str, workers: int, steps: dict) -> dict[str, Any]:
    started = time.time()
    try:
        if kind == "peer":
            row = run_peer(name, workload=workload, workers=workers, **steps)
        else:
            row = run_distrain(name, workload=workload, workers=workers, **steps)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        row = {"name": row_name(kind, name), "workload": workload, "workers": workers}
        row["error"] = str(error)
    return {**row, "wall_s": round(time.time() - started, 1)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default=",".join(MEASURE_STEPS))
    p.add_argument("--workers", type=int, default=2, help="for the multi-worker systems")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--measure-steps", default="", help="e.g. digits_mlp=1200,cnn=60")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the target pairs")
    p.add_argument("--ps-repeats", type=int, default=2, help="rounds of the PS pair")
    p.add_argument("--extras", default="", help=f"once each: {','.join(EXTRAS)}")
    p.add_argument("--lm-repeats", type=int, default=1, help="rounds of the LM workload")
    p.add_argument(
        "--only", default=None, help="systems to run, e.g. inmemory,distrain_allreduce:1"
    )
    p.add_argument("--skip-peers", action="store_true", help="distrain only")
    p.add_argument("--skip-others", action="store_true", help="no one-off rows (Ray Train, ...)")
    p.add_argument("--skip-compression", action="store_true")
    p.add_argument("--skip-lm", action="store_true", help="no LM workload (benchmarks/lm_bench.py)")
    p.add_argument(
        "--large-repeats", type=int, default=1, help="rounds of benchmarks/large_models.py"
    )
    p.add_argument("--skip-large", action="store_true", help="no DDP/ZeRO-1/FSDP comparison")
    p.add_argument("--skip-recovery", action="store_true", help="no benchmarks/recovery.py")
    p.add_argument("--recovery-rounds", type=int, default=2, help="rounds of recovery.py")
    p.add_argument("--skip-grow-back", action="store_true", help="no benchmarks/grow_back.py")
    p.add_argument("--out", type=Path, default=RESULTS / "latest")
    args = p.parse_args()
    unknown = [w for w in args.workloads.split(",") if w not in MEASURE_STEPS]
    unknown += [e for e in filter(None, args.extras.split(",")) if e not in EXTRAS]
    if unknown or min(args.repeats, args.ps_repeats + 1, args.lm_repeats) < 1:
        p.error(
            f"--workloads from {sorted(MEASURE_STEPS)}, --extras from {list(EXTRAS)}, "
            f"--repeats and --lm-repeats >= 1, --ps-repeats >= 0 (unknown: {unknown})"
        )
    args.measure = dict(MEASURE_STEPS)
    for item in filter(None, args.measure_steps.split(",")):
        workload, _, steps = item.partition("=")
        if workload not in MEASURE_STEPS or not steps.isdigit():
            p.error(
                f"--measure-steps: {item!r} is not WORKLOAD=STEPS (WORKLOAD: {list(MEASURE_STEPS)})"
            )
        args.measure[workload] = int(steps)
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("matplotlib") is None:  # the chart; checked before any run
        sys.exit("benchmarks/run.py needs matplotlib: pip install -e '.[bench]' (make bench does)")
    started, info = time.time(), machine()
    runs: list[dict[str, Any]] = []
    for workload in args.workloads.split(","):
        steps = {"warmup_steps": args.warmup_steps, "measure_steps": args.measure[workload]}
        for round_, kind, name, workers in schedule(args, workload):
            print(
                f"{workload} round {round_ + 1}: {name} x{workers} ...", file=sys.stderr, flush=True
            )
            runs.append({**run_one(kind, name, workload, workers, steps), "round": round_})
            rate = runs[-1].get("samples_per_s", "failed")
            print(f"  {rate} samples/s, {runs[-1]['wall_s']} s", file=sys.stderr, flush=True)
    compression = []
    if not args.skip_compression:
        for name in COMPRESSIONS:
            print(f"digits default job: compression={name} ...", file=sys.stderr, flush=True)
            compression.append(run_compression(name, args.workers))
    info |= {"load_average_at_end": os.getloadavg(), "total_s": time.time() - started}
    info |= {"repeats": args.repeats, "ps_repeats": args.ps_repeats, "measure_steps": args.measure}
    info["warmup_steps"] = args.warmup_steps
    from benchmarks.report import write_report

    write_report(args.out, runs, compression, info, workers=args.workers)
    print(f"wrote {args.out}.md, {args.out}.png, {args.out}.jsonl", file=sys.stderr)
    if not args.skip_lm:  # a GPT on a token file: its own table, results/lm_latest.md
        lm = [sys.executable, str(REPO / "benchmarks" / "lm_bench.py"), "--workers"]
        lm += [str(args.workers), "--repeats", str(args.lm_repeats)]
        subprocess.run(lm, check=True, env=_env(), cwd=REPO)
    if not args.skip_large:  # DDP, ZeRO-1, FSDP: speed, memory, checkpoints; large_latest.md
        large = [sys.executable, str(REPO / "benchmarks" / "large_models.py"), "--workers"]
        large += [str(args.workers), "--repeats", str(args.large_repeats)]
        subprocess.run(large, check=True, env=_env(), cwd=REPO)
    if not args.skip_recovery:  # a killed worker: healed with/without a spare, or restarted
        recovery = [sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--rounds"]
        recovery += [str(args.recovery_rounds), "--out", str(RESULTS / "recovery_latest.md")]
        subprocess.run(recovery, check=True, env=_env(), cwd=REPO)
    if not args.skip_grow_back:  # an elastic run back to its workers: in place or checkpoint
        grow = [sys.executable, str(REPO / "benchmarks" / "grow_back.py")]
        grow += ["--out", str(RESULTS / "grow_back_latest.md")]
        subprocess.run(grow, check=True, env=_env(), cwd=REPO)


if __name__ == "__main__":
    main()

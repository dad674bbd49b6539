"""`make gpu-check`: prove distrain's CUDA path on the GPUs of this machine (issue 15).

    make gpu-check                          # everything, bounded by --budget-s (default 270 s)
    make gpu-check ARGS='--only correctness'

Without a CUDA GPU it prints one line saying so and exits 0: nothing is checked. With one, it
runs three sections and writes benchmarks/results/gpu_check.md and .json (one row per check:
pass / FAIL / error with its message / not run with the reason):

* correctness: distrain on the GPU against a plain single-process loop on the same GPU, at the
  same seed, global batch, data order and steps (the digits MLP of tests/test_equivalence.py,
  TF32 off so fp32 is comparable): the relative L2 distance of the final parameters, or, for
  the lossy or asynchronous methods (PowerSGD, async parameter server), the validation
  accuracy against the reference's. FSDP is compared on the parameters too. A checkpoint
  written on the GPU is resumed on the CPU and one written on the CPU on the GPU.
* speed: distrain (benchmarks/distrain_bench.py) and torchrun DDP (peers/torchrun_ddp.py,
  NCCL) on the CNN and ResNet-18 workloads: samples/s and time to first step, same batch.
* stragglers: two workers, one slowed on purpose (DISTRAIN_SLOW_RANK): the time split and
  whether the detector names the slow rank.

Multi-worker checks use `WORKERS` workers. With one GPU they share it (trainer.gpus_per_worker
=0.5): NCCL refuses two ranks on one GPU, so their collectives run over gloo with CUDA tensors;
the NCCL path itself then is NOT exercised, and the report says so. With two or more GPUs every
worker has its own and collectives use NCCL. Speed runs use one worker per GPU (one on a
single-GPU machine). Add a speed workload with one entry in SPEED_WORKLOADS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from distrain.simulate import SLOW_RANK_ENV  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SEED, STEPS, BATCH, LR = 3, 30, 64, 0.05  # as tests/test_equivalence.py
BASE = [
    "trainer.epochs=2",
    f"trainer.max_steps={STEPS}",
    f"data.batch_size={BATCH}",
    f"optimizer.lr={LR}",
    f"trainer.seed={SEED}",
    "model.hidden_sizes=[32,32]",
    "logger.progress=none",
    "trainer.tf32=false",  # fp32 against fp32: TF32 rounding would hide a real difference
    "trainer.setup_timeout_s=120",
]
# Lossy or asynchronous methods have no exact reference: they train longer (30 steps leave the
# reference at ~55 % accuracy) and must reach its validation accuracy within a few points.
LONGER = ["trainer.max_steps=null", "trainer.epochs=6"]
# (name, overrides, precision of the reference, how to compare: ("params", tolerance) or
#  ("accuracy", allowed drop in points))
CORRECTNESS: list[tuple[str, list[str], str, tuple[str, float]]] = [
    ("allreduce fp32, 1 worker", ["trainer.workers=1"], "32", ("params", 1e-4)),
    ("allreduce fp32", [], "32", ("params", 1e-4)),
    ("allreduce compression=bf16", ["aggregator.compression=bf16"], "32", ("params", 2e-2)),
    (
        "allreduce compression=powersgd",
        ["aggregator.compression=powersgd", *LONGER],
        "32",
        ("accuracy", 5),
    ),
    ("precision=bf16", ["trainer.precision=bf16"], "bf16", ("params", 3e-2)),
    ("precision=16", ["trainer.precision=16"], "16", ("params", 3e-2)),
    ("ZeRO-1 (shard_optimizer)", ["trainer.shard_optimizer=true"], "32", ("params", 1e-4)),
    ("FSDP (aggregator=fsdp)", ["aggregator=fsdp"], "32", ("params", 1e-4)),
    ("gradient accumulation", ["data.micro_batch_size=8"], "32", ("params", 1e-4)),
    ("parameter server sync", ["aggregator=parameter_server"], "32", ("params", 1e-4)),
    # torch.profiler with CUDA activities on every rank: the same training, and kernels traced.
    ("profiled (logger.profile_steps)", ["logger.profile_steps=3"], "32", ("params", 1e-4)),
    (
        "parameter server async",
        ["aggregator=parameter_server", "aggregator.mode=async", *LONGER],
        "32",
        ("accuracy", 5),
    ),
]
# One entry per workload: its name in benchmarks/workloads.py and the steps to time.
SPEED_WORKLOADS = {"cnn": (20, 100), "resnet18": (10, 40)}


class Report:
    """Each check's outcome, whatever happens in the others."""

    def __init__(self, deadline: float, match: list[str] | None = None) -> None:
        self.deadline, self.match = deadline, match
        self.rows: list[dict[str, Any]] = []

    def check(
        self, section: str, name: str, run: Callable[[], dict[str, Any]], why_not: str = ""
    ) -> None:
        if self.match and not any(m in name for m in self.match):
            return  # --match: only the checks named
        row: dict[str, Any] = {"section": section, "check": name}
        started = time.monotonic()
        if why_not:
            row |= {"status": "not run", "detail": why_not}
        elif started > self.deadline:
            row |= {"status": "not run", "detail": "time budget (--budget-s) spent"}
        else:
            try:
                measured = run()
                ok = measured.pop("ok")
                row |= {"status": "pass" if ok else "FAIL", **measured}
            except Exception as error:  # one broken check must not hide the others
                lines = traceback.format_exc().strip().splitlines()
                row |= {
                    "status": "error",
                    "detail": f"{type(error).__name__}: {str(error).strip()[:500]}",
                    "traceback_tail": lines[-6:],
                }
        row["seconds"] = round(time.monotonic() - started, 1)
        self.rows.append(row)
        print(f"[{row['status']:>7}] {section}: {name} ({row['seconds']} s)", flush=True)


# --- correctness ------------------------------------------------------------------------------


def merged(*lists: list[str]) -> list[str]:
    """Overrides in order, a later value of a key replacing an earlier one (Hydra refuses two)."""
    out: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            key, value = override.split("=", 1)
            out[key] = value
    return [f"{k}={v}" for k, v in out.items()]


def _compose(overrides: list[str]) -> dict[str, Any]:
    from distrain.cli import compose_job

    return compose_job(*overrides)


def reference_loop(
    job: dict[str, Any], device: torch.device, precision: str
) -> tuple[dict, float, int]:
    """Single-process training on `device`, in distrain's data order: the final state_dict, the
    validation accuracy and the steps trained."""
    from distrain import build
    from distrain import device as devices
    from distrain.config import DataConfig
    from distrain.sharding import epoch_permutation

    splits = build.build_splits(DataConfig.of(job["data"]))
    x, y = (t.to(device) for t in splits.train.tensors)
    trainer = job["trainer"]
    total_steps = trainer["epochs"] * (len(x) // BATCH)
    total_steps = min(total_steps, trainer["max_steps"] or total_steps)
    torch.manual_seed(job["trainer"]["seed"])
    model = build.build_model(job["model"], splits).to(device)
    loss_fn = build.build_loss(job["loss"]).to(device)
    optimizer = build.build_optimizer(job["optimizer"], model, global_batch=BATCH)
    autocast = devices.autocast_factory(device.type, precision)
    scaler = devices.grad_scaler(device.type, precision)
    step, epoch = 0, 0
    while step < total_steps:
        perm = epoch_permutation(len(x), job["trainer"]["seed"], epoch).to(device)
        for k in range(len(x) // BATCH):
            idx = perm[k * BATCH : (k + 1) * BATCH]
            optimizer.zero_grad()
            with autocast():
                loss = loss_fn(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if step == total_steps:
                break
        epoch += 1
    xv, yv = (t.to(device) for t in splits.val.tensors)
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, accuracy, total_steps


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    if a.keys() != b.keys():
        raise KeyError(f"parameter names differ: {sorted(a)} vs {sorted(b)}")
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def train(overrides: list[str], run_dir: Path) -> tuple[dict[str, Any], dict]:
    from distrain import driver
    from distrain.rundir import RunDirectory

    rundir = RunDirectory(run_dir)
    # Kept workers (warm_workers.py): the next check of the same shape runs on the same
    # processes, which proves that path on the GPU too (and saves each check a start-up).
    metrics = driver.train(_compose(overrides), rundir, keep_workers=True)
    return metrics, torch.load(rundir.model_path, weights_only=True)


def correctness_check(
    overrides: list[str], precision: str, compare: tuple[str, float], setup: list[str], tmp: Path
) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        job_overrides = merged(BASE, setup, overrides)
        device = torch.device(job_overrides_device(job_overrides))
        reference, reference_accuracy, steps = reference_loop(
            _compose(job_overrides), device, precision
        )
        run_dir = tmp / f"run{time.monotonic_ns()}"
        metrics, params = train(job_overrides, run_dir)
        out: dict[str, Any] = {
            "steps": metrics["steps"],
            "device": metrics["device"],
            "transport": metrics["aggregator"][0].get("transport", "-"),
            "val_accuracy": round(metrics.get("val_accuracy", float("nan")), 4),
            "reference_val_accuracy": round(reference_accuracy, 4),
            # The same pids as the check before: it ran on the workers that check kept.
            "worker_pids": [
                w["pid"] for w in json.loads((run_dir / "workers.json").read_text())["workers"]
            ],
        }
        kind, tolerance = compare
        distance = relative_distance(params, reference)
        out["relative_distance"] = float(f"{distance:.3g}")
        if kind == "params":
            out["tolerance"] = tolerance
            ok = distance <= tolerance
        else:  # lossy/asynchronous: no exact reference; it must learn as well, within points
            out["allowed_drop_points"] = tolerance
            ok = metrics["val_accuracy"] * 100 >= reference_accuracy * 100 - tolerance
        if (run_dir / "profile").is_dir():  # every rank's trace; on a GPU with its kernels
            out["profile_kernels"] = traced_kernels(run_dir / "profile")
            ok = ok and len(out["profile_kernels"]) == metrics["workers"]
            ok = ok and (device.type != "cuda" or min(out["profile_kernels"]) > 0)
        out["ok"] = ok and metrics["steps"] == steps and metrics["device"] == device.type
        return out

    return run


def traced_kernels(directory: Path) -> list[int]:
    """Each rank's count of GPU kernel events in its profile trace (distrain/profiling.py)."""
    counts = []
    for path in sorted(directory.glob("rank*.pt.trace.json.gz")):
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
        counts.append(sum(event.get("cat") == "kernel" for event in events))
    return counts


def job_overrides_device(overrides: list[str]) -> str:
    devices = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.device=")]
    return devices[-1] if devices else "cpu"


def checkpoint_check(first: str, second: str, setup: list[str], tmp: Path) -> Callable:
    """Train epoch 1 on `first`, resume epoch 2 on `second`; compare with 2 epochs on `first`."""

    def run() -> dict[str, Any]:
        common = merged(BASE, setup, ["trainer.max_steps=null", "trainer.workers=1"])
        on = {"cuda": ["trainer.device=cuda"], "cpu": ["trainer.device=cpu"]}
        if job_overrides_device(setup) == "cpu":  # --cpu-dry-run: both sides on the CPU
            on["cuda"] = on["cpu"]
        _, whole = train(merged(common, on[first]), tmp / f"whole{time.monotonic_ns()}")
        run_dir = tmp / f"split{time.monotonic_ns()}"
        train(merged(common, on[first], ["trainer.epochs=1"]), run_dir)
        metrics, resumed = train(
            merged(common, on[second], [f"resume={run_dir}"]), tmp / f"resumed{time.monotonic_ns()}"
        )
        distance = relative_distance(resumed, whole)
        return {
            "ok": distance <= 1e-3 and metrics["device"] == on[second][0].split("=")[1],
            "relative_distance": float(f"{distance:.3g}"),
            "tolerance": 1e-3,
            "steps": metrics["steps"],
        }

    return run


# --- speed ------------------------------------------------------------------------------------


def speed_checks(report: Report, gpus: int) -> None:
    from benchmarks.peers.launch import run_peer
    from benchmarks.run import run_distrain

    workers = gpus  # one worker per GPU; one on a single-GPU machine
    for workload, (warmup, measure) in SPEED_WORKLOADS.items():
        steps = {"warmup_steps": warmup, "measure_steps": measure}

        def distrain_row(workload: str = workload, steps: dict = steps) -> dict[str, Any]:
            row = run_distrain(
                "allreduce",
                workload=workload,
                workers=workers,
                set="trainer.device=cuda",
                timeout_s=150,
                **steps,
            )
            return {"ok": True, **_speed_fields(row)}

        def torchrun_row(workload: str = workload, steps: dict = steps) -> dict[str, Any]:
            row = run_peer(
                "torchrun_ddp",
                timeout=150,
                workload=workload,
                workers=workers,
                device="cuda",
                **steps,
            )
            return {"ok": True, **_speed_fields(row)}

        report.check("speed", f"distrain allreduce {workload} x{workers}", distrain_row)
        report.check("speed", f"torchrun DDP (NCCL) {workload} x{workers}", torchrun_row)


def _speed_fields(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("samples_per_s", "time_to_first_step_s", "final_loss", "transport", "steps")
    return {k: row[k] for k in keys if k in row}


# --- stragglers -------------------------------------------------------------------------------


def straggler_check(setup: list[str], tmp: Path) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        run_dir = tmp / f"straggler{time.monotonic_ns()}"
        overrides = merged(
            BASE,
            setup,
            [
                "trainer.max_steps=null",
                "trainer.epochs=3",
                "data.batch_size=32",
                "logger.log_every_n_steps=5",
                "logger.straggler_patience=2",
            ],
        )
        os.environ[SLOW_RANK_ENV] = "1:0.05"  # rank 1 sleeps 50 ms a step (distrain/simulate.py)
        try:
            metrics, _ = train(overrides, run_dir)
        finally:
            del os.environ[SLOW_RANK_ENV]
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        split = {
            tag: round(sum(e.value for e in events.Scalars(tag)) / len(events.Scalars(tag)), 5)
            for tag in events.Tags()["scalars"]
            if tag.startswith("time/")
        }
        found = [s["rank"] for s in metrics["stragglers"]]
        return {
            "ok": found[:1] == [1],
            "stragglers": found,
            "ratio": metrics["stragglers"][0]["ratio"] if found else None,
            "mean_time_split_s": split,
        }

    return run


# --- main -------------------------------------------------------------------------------------


def write(report: Report, info: dict[str, Any], stem: str, results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(
        json.dumps({**info, "checks": report.rows}, indent=1) + "\n"
    )
    lines = [f"# GPU check: {info['gpu']} x{info['gpus']}", ""]
    lines += [f"* {k}: {v}" for k, v in info.items() if k not in ("gpu", "gpus")]
    lines += ["", "| section | check | status | measured |", "|---|---|---|---|"]
    for row in report.rows:
        shown = {
            k: v
            for k, v in row.items()
            if k not in ("section", "check", "status", "traceback_tail")
        }
        measured = ", ".join(f"{k}={v}" for k, v in shown.items()).replace("|", "/")
        lines.append(f"| {row['section']} | {row['check']} | {row['status']} | {measured} |")
    path = results / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget-s", type=float, default=240, help="no check starts after this")
    p.add_argument("--only", choices=("correctness", "speed", "stragglers"), action="append")
    p.add_argument("--match", action="append", help="only checks whose name contains this")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="develop this script without a GPU: the same checks on CPU (proves nothing on CUDA)",
    )
    p.add_argument("--ray-address", help="join this Ray instead of starting one (the tests)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu-check: no CUDA GPU found (torch.cuda.is_available() is false): nothing checked.")
        return 0
    started = time.monotonic()
    dry = args.cpu_dry_run
    gpus = 0 if dry else torch.cuda.device_count()
    workers = 2 if gpus < 2 else 2 ** int(math.log2(min(gpus, 8)))
    # One GPU: two workers share it, over gloo (NCCL refuses two ranks on one GPU).
    setup = [f"trainer.device={'cpu' if dry else 'cuda'}", f"trainer.workers={workers}"]
    if gpus == 1:
        setup.append("trainer.gpus_per_worker=0.5")
    if args.ray_address:
        setup.append(f"cluster.address={args.ray_address}")
    info = {
        "gpu": "none (CPU DRY RUN: nothing about CUDA is shown)"
        if dry
        else torch.cuda.get_device_name(0),
        "gpus": gpus,
        "workers": workers,
        "collectives": "NCCL" if gpus >= 2 else "gloo (with CUDA tensors when one GPU is shared)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    print(f"gpu-check on {info['gpu']} x{gpus}: {workers} workers, {info['collectives']}")
    report = Report(started + args.budget_s, args.match)
    sections = args.only or ["correctness", "stragglers", "speed"]
    from distrain import cluster, config

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # One Ray for every in-process run (their cluster settings are these).
        cluster.keep_connected(config.typed(_compose(merged(BASE, setup, []))).cluster)
        try:
            if "correctness" in sections:
                for name, overrides, precision, compare in CORRECTNESS:
                    check = correctness_check(overrides, precision, compare, setup, tmp)
                    report.check("correctness", name, check)
                for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
                    name = f"checkpoint written on {first}, resumed on {second}"
                    report.check("correctness", name, checkpoint_check(first, second, setup, tmp))
            if "stragglers" in sections:
                report.check("stragglers", "slowed rank 1 found", straggler_check(setup, tmp))
        finally:
            cluster.release()
        if "speed" in sections and not dry:
            speed_checks(report, gpus)
    info["wall_s"] = round(time.monotonic() - started, 1)
    path = write(report, info, "gpu_check_cpu_dry_run" if dry else "gpu_check", args.results_dir)
    failed = [r for r in report.rows if r["status"] in ("FAIL", "error")]
    print(f"gpu-check: {len(report.rows) - len(failed)} of {len(report.rows)} not failed; {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

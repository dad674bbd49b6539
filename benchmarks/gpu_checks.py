"""The checks `make gpu-check` runs (benchmarks/gpu_check.py): distrain on the GPU against a plain
single-process loop on the same GPU (correctness), a checkpoint moved between devices, and a
slowed rank found by the straggler detector. Each `*_check` returns the function that runs it and
returns its measurements, with "ok"."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.small_job import small_job
from distrain.simulate import SLOW_RANK_ENV

SEED, STEPS, BATCH, LR = 3, 30, 64, 0.05  # as tests/test_equivalence.py
BASE = [
    *small_job(steps=STEPS, batch=BATCH, lr=LR, seed=SEED),
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


# --- correctness ------------------------------------------------------------------------------


def merged(*lists: list[str]) -> list[str]:
    """Overrides in order, a later value of a key replacing an earlier one (Hydra refuses two)."""
    out: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            key, value = override.split("=", 1)
            out[key] = value
    return [f"{k}={v}" for k, v in out.items()]


def compose(overrides: list[str]) -> dict[str, Any]:
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
    metrics = driver.train(compose(overrides), rundir, keep_workers=True)
    return metrics, torch.load(rundir.model_path, weights_only=True)


def correctness_check(
    overrides: list[str], precision: str, compare: tuple[str, float], setup: list[str], tmp: Path
) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        job_overrides = merged(BASE, setup, overrides)
        device = torch.device(job_overrides_device(job_overrides))
        reference, reference_accuracy, steps = reference_loop(
            compose(job_overrides), device, precision
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
        first = metrics["stragglers"][0] if found else {}
        return {
            # A sleeping rank is slow at its own work, not starved of a CPU core.
            "ok": found[:1] == [1] and first["cause"] == "compute",
            "stragglers": found,
            "ratio": first.get("ratio"),
            "cause": first.get("cause"),
            "mean_time_split_s": split,
        }

    return run

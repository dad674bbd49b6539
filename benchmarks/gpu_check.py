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
single-GPU machine). Add a speed workload with one entry in SPEED_WORKLOADS; the correctness and
straggler checks are in benchmarks/gpu_checks.py (a correctness case: one entry in CORRECTNESS).
"""

from __future__ import annotations

import argparse
import json
import math
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

from benchmarks.gpu_checks import (  # noqa: E402
    BASE,
    CORRECTNESS,
    checkpoint_check,
    compose,
    correctness_check,
    merged,
    straggler_check,
)

RESULTS = REPO / "benchmarks" / "results"
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
        cluster.keep_connected(config.typed(compose(merged(BASE, setup, []))).cluster)
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

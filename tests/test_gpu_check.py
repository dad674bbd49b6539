"""`make gpu-check` on a machine without a GPU: one line saying nothing was checked, exit 0; and
its checks run on the CPU (`--cpu-dry-run`): the script works before a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, make gpu-check runs the check")
def test_gpu_check_without_a_gpu_says_so_in_one_line() -> None:
    before = sorted((ROOT / "benchmarks" / "results").glob("gpu_check*"))
    # Not the calling make's variables (it exports them): `make test ARGS=-x` must not pass `-x`
    # to gpu_check.py.
    callers = ("ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {key: value for key, value in os.environ.items() if key not in callers}
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "gpu-check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU found" in lines[0] and "nothing checked" in lines[0]
    # Nothing pretends to be a result.
    assert sorted((ROOT / "benchmarks" / "results").glob("gpu_check*")) == before


@pytest.mark.slow
def test_the_checks_themselves_run_as_a_cpu_dry_run(ray_address: str, tmp_path: Path) -> None:
    """The script a GPU machine runs, run here on the CPU (three of its checks, the profiled one
    included): a GPU session's minutes are not spent finding that the script itself is broken
    (it was: a config dict where the typed cluster config belongs)."""
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
            "--only", "correctness", "--match", "allreduce fp32", "--match", "profiled",
            "--ray-address", ray_address, "--results-dir", str(tmp_path),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())["checks"]
    assert [(row["check"], row["status"]) for row in rows] == [
        ("allreduce fp32, 1 worker", "pass"),
        ("allreduce fp32", "pass"),
        ("profiled (logger.profile_steps)", "pass"),
    ]
    assert rows[2]["profile_kernels"] == [0, 0]  # both ranks traced; no kernels on a CPU
    # The checks keep their workers: the second 2-worker check ran on the first one's.
    assert rows[2]["worker_pids"] == rows[1]["worker_pids"] != rows[0]["worker_pids"]

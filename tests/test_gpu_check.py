"""`make gpu-check` on a machine without a GPU: one line saying nothing was checked, exit 0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, make gpu-check runs the check")
def test_gpu_check_without_a_gpu_says_so_in_one_line() -> None:
    before = sorted((ROOT / "benchmarks" / "results").glob("gpu_check*"))
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "gpu-check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU found" in lines[0] and "nothing checked" in lines[0]
    # Nothing pretends to be a result.
    assert sorted((ROOT / "benchmarks" / "results").glob("gpu_check*")) == before

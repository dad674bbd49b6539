"""Never lose work: real Ray, real actors and processes killed, frozen and interrupted.

Each scenario runs the real CLI against the session's Ray and compares the final parameters with
one uninterrupted run of the same job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch

from distrain import driver
from distrain.rundir import RunDirectory
from tests.conftest import DISTRAIN, compose_job, run_cli

# 20 epochs x 22 steps: long enough to be interrupted, short enough for a test.
JOB = [
    "trainer.epochs=20",
    "trainer.checkpoint_every_n_steps=10",
    "model.hidden_sizes=[64,64]",
    "optimizer.lr=0.05",
    "logger.progress=plain",
]
STEPS = 20 * (1437 // 64)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same job, uninterrupted, on 2 workers."""
    run_dir = RunDirectory(tmp_path_factory.mktemp("reference"))
    metrics = driver.train(compose_job(*JOB, "trainer.workers=2", "logger.progress=none"), run_dir)
    assert metrics["steps"] == STEPS
    return torch.load(run_dir.model_path, weights_only=True)


def start(ray_address: str, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*DISTRAIN, *JOB, f"cluster.address={ray_address}", f"hydra.run.dir={run_dir}", *overrides],
        cwd=run_dir.parent,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def first_checkpoint(run_dir: Path) -> Callable[[], bool]:
    return lambda: (run_dir / "checkpoints" / "latest").exists()


def worker(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "workers.json").read_text())["workers"][rank]


def finish(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout_s)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_same_parameters(run_dir: Path, reference: dict) -> None:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_worker_actor_killed_recovers_to_the_same_parameters(
    ray_address: str, tmp_path: Path, reference: dict
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir)
    wait_for(first_checkpoint(run_dir), proc)
    ray.kill(ray.get_actor(worker(run_dir, 1)["actor"], namespace="distrain"))
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "restart 1/3" in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["steps"] == STEPS
    assert "rank 1" in metrics["failures"][0]["error"]
    assert_same_parameters(run_dir, reference)


def test_worker_process_sigkilled_recovers_to_the_same_parameters(
    ray_address: str, tmp_path: Path, reference: dict
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir)
    wait_for(first_checkpoint(run_dir), proc)
    os.kill(worker(run_dir, 0)["pid"], signal.SIGKILL)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["steps"] == STEPS
    assert_same_parameters(run_dir, reference)


def test_frozen_worker_is_detected_named_and_recovered(
    ray_address: str, tmp_path: Path, reference: dict
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir, "trainer.step_timeout_s=4")
    wait_for(first_checkpoint(run_dir), proc)
    frozen = worker(run_dir, 1)
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        stderr = finish(proc)
    finally:
        # The group's teardown kills it; continue it in case it did not.
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen["pid"], signal.SIGCONT)
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["restarts"] == 1
    error = metrics["failures"][0]["error"]
    assert "trainer.step_timeout_s=4" in error
    assert (
        error.index(f"rank 1 (node {frozen['node_ip']}, pid {frozen['pid']})")
        < error.find("rank 0")
        or "rank 0" not in error
    )  # the frozen rank is named first
    assert_same_parameters(run_dir, reference)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_ctrl_c_then_resume_ends_with_the_same_parameters(
    ray_address: str, tmp_path: Path, reference: dict, before: int, after: int
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir, f"trainer.workers={before}")
    wait_for(first_checkpoint(run_dir), proc)
    proc.send_signal(signal.SIGINT)
    stderr = finish(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"distrain resume={run_dir}" in stderr
    stopped_at = torch.load(
        run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text(),
        weights_only=True,
    )["step"]
    assert 0 < stopped_at < STEPS

    resumed = run_cli(
        f"resume={run_dir}",
        f"trainer.workers={after}",
        f"cluster.address={ray_address}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at}" in resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["workers"] == after
    assert_same_parameters(run_dir, reference)
    # TensorBoard: the resumed run appended to the same event files without duplicate points.
    from tests.test_cli import scalars

    series = scalars(run_dir)
    steps = [step for step, _ in series["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert [step for step, _ in series["epoch/val_loss"]] == list(range(1, 21))


def test_too_many_failures_stop_with_the_last_checkpoint_intact(
    ray_address: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir, "trainer.max_failures=0")
    wait_for(first_checkpoint(run_dir), proc)
    os.kill(worker(run_dir, 1)["pid"], signal.SIGKILL)
    stderr = finish(proc)
    assert proc.returncode == 1, stderr[-3000:]
    assert "gave up after trainer.max_failures=0 restarts" in stderr
    assert "Traceback" not in stderr
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    assert str(latest) in stderr
    assert torch.load(latest, weights_only=True)["step"] > 0

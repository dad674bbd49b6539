"""Workers kept between the jobs of one process (distrain/warm_workers.py): the next job of the
same shape runs on the same processes and ends exactly as on new ones; anything else frees them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from distrain import driver, warm_workers
from distrain.rundir import RunDirectory
from tests.conftest import compose_job

pytestmark = pytest.mark.slow  # every test here runs whole jobs

# Dropout: each rank's random stream matters, so a kept process that carried its last job's
# generator state into the next job would end elsewhere.
JOB = [
    "trainer.epochs=2",
    "trainer.max_steps=30",
    "model.hidden_sizes=[32,32]",
    "model.dropout=0.2",
    "logger.progress=none",
]


def train(tmp_path: Path, name: str, *overrides: str, keep: bool = True) -> dict[str, Any]:
    """One in-process job; its metrics, final parameters and workers.json."""
    run_dir = RunDirectory(tmp_path / name)
    metrics = driver.train(compose_job(*JOB, *overrides), run_dir, keep_workers=keep)
    workers = json.loads((run_dir.path / "workers.json").read_text())["workers"]
    return {
        "metrics": metrics,
        "params": torch.load(run_dir.model_path, weights_only=True),
        "pids": [w["pid"] for w in workers],
        "actors": [w["actor"] for w in workers],
    }


def assert_gone(actors: list[str]) -> None:
    """Every named actor is dead (ray.kill is asynchronous: the names go soon after)."""
    deadline = time.monotonic() + 30
    left = set(actors)
    while left and time.monotonic() < deadline:
        for name in list(left):
            try:
                ray.get_actor(name, namespace="distrain")
            except ValueError:
                left.discard(name)
        time.sleep(0.1)
    assert not left, f"kept actors left behind: {sorted(left)}"


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_next_job_runs_on_the_kept_workers_and_ends_as_on_new_ones(
    ray_address: str, tmp_path: Path
) -> None:
    # A wide model first: its parameters, gradients and momentum take ~150 MB more per worker
    # from the first step on (3 steps: it is not there to learn).
    first = train(
        tmp_path,
        "first",
        "trainer.workers=2",
        "model.hidden_sizes=[3072,3072]",
        "trainer.max_steps=3",
    )
    # Another job of the same shape (another seed, learning rate and model): the same processes
    # and actors take it.
    kept = train(
        tmp_path,
        "kept",
        "trainer.workers=2",
        "trainer.seed=2",
        "optimizer.lr=0.05",
        "model.hidden_sizes=[48]",
    )
    assert kept["pids"] == first["pids"] and kept["actors"] == first["actors"]
    # Each job reports its own peak memory, not the largest of the jobs its processes ran.
    peak_mb = {
        name: [a["peak_memory_mb"] for a in run["metrics"]["aggregator"]]
        for name, run in (("first", first), ("kept", kept))
    }
    assert max(peak_mb["kept"]) < min(peak_mb["first"]) - 80, peak_mb
    warm_workers.release()
    assert_gone(first["actors"])
    fresh = train(
        tmp_path,
        "fresh",
        "trainer.workers=2",
        "trainer.seed=2",
        "optimizer.lr=0.05",
        "model.hidden_sizes=[48]",
        keep=False,
    )
    assert not set(fresh["pids"]) & set(first["pids"])
    assert_equal(kept["params"], fresh["params"])  # bitwise: nothing of the first job leaked
    assert kept["metrics"]["val_loss"] == fresh["metrics"]["val_loss"]
    # Not kept (keep_workers=False): the job's actors went with it.
    assert_gone(fresh["actors"])


def test_a_job_of_another_shape_frees_the_kept_workers_first(
    ray_address: str, tmp_path: Path
) -> None:
    """Two kept workers hold 2 of the session's 4 CPUs; a 3-worker job fits only once they are
    freed, before its resource check."""
    two = train(tmp_path, "two", "trainer.workers=2")
    three = train(tmp_path, "three", "trainer.workers=3", "data.batch_size=66", keep=False)
    assert len(three["pids"]) == 3 and not set(three["pids"]) & set(two["pids"])
    assert_gone(two["actors"])


def test_a_kept_worker_that_died_meanwhile_is_not_used(ray_address: str, tmp_path: Path) -> None:
    first = train(tmp_path, "first", "trainer.workers=2")
    os.kill(first["pids"][1], signal.SIGKILL)
    again = train(tmp_path, "again", "trainer.workers=2", keep=False)
    assert not set(again["pids"]) & set(first["pids"])  # the survivor was freed with it
    assert_gone(first["actors"])
    assert again["metrics"]["steps"] == 30 and again["metrics"]["restarts"] == 0


def test_workers_claimed_by_a_job_that_fails_before_its_group_starts_are_freed(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job takes the kept workers, then fails before it starts on them (here its TensorBoard
    run cannot be opened): they are freed, not left holding the CPUs of the next job."""
    from distrain.recording import RunRecorder

    first = train(tmp_path, "first", "trainer.workers=2")

    def unwritable(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("the run dir is not writable")

    monkeypatch.setattr(RunRecorder, "open", unwritable)
    with pytest.raises(PermissionError):
        train(tmp_path, "failed", "trainer.workers=2")
    assert_gone(first["actors"])
    # Their placement group too: it would hold 2 of the session's CPUs until the process ends.
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0.0) == total

"""--multirun sweeps: one run dir per job, the summary, and a sweep continued after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from distrain.config import ConfigError
from distrain.sweep import RESUME, RUN, SKIP, job_row, markdown_table, plan
from tests.conftest import DISTRAIN, free_kept_workers_before, run_cli, slowed

FINISHED = {"wall_s": 12.5, "val_accuracy": 0.9, "samples_per_s": 1000.0, "steps": 22}


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))


def test_plan_skips_a_finished_job(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.json", {**FINISHED, "overrides": ["optimizer.lr=0.1"]})
    assert plan(tmp_path, ["optimizer.lr=0.1"]) == (
        SKIP,
        {**FINISHED, "overrides": ["optimizer.lr=0.1"]},
    )
    # Continuing on another cluster or with another display is the same job.
    moved = ["optimizer.lr=0.1", "cluster.address=10.0.0.1:6379", "logger.progress=none"]
    assert plan(tmp_path, moved)[0] == SKIP


def test_plan_refuses_a_finished_run_of_other_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.json", {**FINISHED, "overrides": ["optimizer.lr=0.1"]})
    with pytest.raises(ConfigError, match=r"other overrides \(optimizer.lr=0.1\).*new hydra"):
        plan(tmp_path, ["optimizer.lr=0.5"])


def test_plan_resumes_from_a_checkpoint_and_reruns_the_rest(tmp_path: Path) -> None:
    assert plan(tmp_path, []) == (RUN, None)  # never started
    _write(tmp_path / "failed.json", {"error": "training failed: worker died"})
    assert plan(tmp_path, []) == (RUN, None)  # failed: run again
    _write(tmp_path / "metrics.json", '{"wall_s": 1.0')  # not JSON: not finished
    assert plan(tmp_path, []) == (RUN, None)
    _write(tmp_path / "metrics.json", {"epochs": 1})  # no wall time: not a finished run's
    assert plan(tmp_path, []) == (RUN, None)
    _write(tmp_path / "checkpoints" / "latest", "step-000100")
    assert plan(tmp_path, []) == (RESUME, None)


def test_summary_rows_and_table(tmp_path: Path) -> None:
    _write(tmp_path / "0" / "metrics.json", FINISHED)
    _write(tmp_path / "1" / "failed.json", {"error": "configuration error: bad\nsecond line"})
    (tmp_path / "2").mkdir()
    common = ["trainer.epochs=1"]
    rows = [
        job_row(n, [f"optimizer.lr={n}", *common], tmp_path / str(n), time.time() + 60)
        for n in range(3)
    ]
    assert [r["status"] for r in rows] == [
        "skipped (finished before)",  # its metrics.json is older than the sweep's start
        "FAILED",
        "incomplete",
    ]
    assert rows[0]["val_accuracy"] == 0.9 and rows[1]["error"].startswith("configuration error")
    table = markdown_table(rows).splitlines()
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert header == ["job", "overrides", "val_accuracy", "samples/s", "wall_s", "status"]
    assert "trainer.epochs=1" not in "\n".join(table)  # shared by every job: not a column value
    assert table[2].split("|")[2].strip() == "optimizer.lr=0"
    assert "0.9000" in table[2] and "1,000" in table[2] and "12.5" in table[2]
    assert "FAILED: configuration error: bad" in table[3] and "second line" not in table[3]


EPOCHS = 4
SWEEP = [
    "--multirun",
    "trainer.workers=1,2",
    "optimizer.lr=0.05,0.1",
    f"trainer.epochs={EPOCHS}",
    "trainer.checkpoint_every_n_steps=10",
    "model.hidden_sizes=[32]",
    "logger.progress=plain",
]


def _finished(job_dir: Path) -> bool:
    try:
        return "overrides" in json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_a_sweep_stopped_mid_job_continues_with_only_what_is_missing(
    ray_address: str, tmp_path: Path
) -> None:
    """4 jobs; Ctrl-C while job 1 trains (after its first checkpoint): the sweep stops with exit
    code 130 and job 2 never starts. The same command again skips job 0 (finished), continues
    job 1 from its checkpoint to the same step count in the same run dir, runs jobs 2 and 3
    (job 3 on the workers job 2 kept: the same shape), then prints and writes the summary.
    A regression test: a Ctrl-C that reached a job used to
    be dropped when the job finished, and the sweep ran on to the end."""
    sweep_dir = tmp_path / "sweep"
    command = [*DISTRAIN, *SWEEP, f"cluster.address={ray_address}", f"hydra.sweep.dir={sweep_dir}"]
    free_kept_workers_before(command)
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Rank 0 sleeps 10 ms a step, so job 1 is still training when the stop arrives, on any
        # machine: the driver sees a checkpoint a few hundred ms after the workers pass it.
        env=slowed(0, 0.01),
    )
    latest = sweep_dir / "1" / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 240
        while not latest.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        assert latest.exists(), "job 1 wrote no checkpoint in time"
        proc.send_signal(signal.SIGINT)
        _, first_err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, first_err[-3000:]
    assert "the sweep stops here" in first_err and "Traceback" not in first_err
    assert _finished(sweep_dir / "0") and not _finished(sweep_dir / "1"), first_err[-3000:]
    assert not (sweep_dir / "2").exists() and not (sweep_dir / "summary.json").exists()
    job0_written = (sweep_dir / "0" / "metrics.json").stat().st_mtime_ns

    again = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distrain: job 0 (" in again.stderr and "skipped (finished)" in again.stderr
    assert again.stderr.count("skipped (finished)") == 1, again.stderr[-3000:]
    assert (sweep_dir / "0" / "metrics.json").stat().st_mtime_ns == job0_written
    assert "job 1 (" in again.stderr and "resuming from its last checkpoint" in again.stderr
    steps = EPOCHS * (1437 // 64)
    resumed = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert resumed["steps"] == steps and resumed["epochs"] == EPOCHS

    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["job"] for r in rows] == [0, 1, 2, 3]
    assert [r["status"] for r in rows] == ["skipped (finished before)"] + ["finished"] * 3
    for n, row in enumerate(rows):
        metrics = json.loads((sweep_dir / str(n) / "metrics.json").read_text())
        assert row["overrides"] == metrics["overrides"]
        assert row["val_accuracy"] == metrics["val_accuracy"]
        assert metrics["workers"] == len(metrics["nodes"]) == (1 if n < 2 else 2)
        assert (sweep_dir / str(n) / "model.pt").exists()
    # Job numbers follow the overrides in order, so a continued sweep meets the same jobs.
    expected = [(w, lr) for w in ("1", "2") for lr in ("0.05", "0.1")]
    for n, (workers, lr) in enumerate(expected):
        assert rows[n]["overrides"][:2] == [f"trainer.workers={workers}", f"optimizer.lr={lr}"]
    pids = [
        [w["pid"] for w in json.loads((sweep_dir / str(n) / "workers.json").read_text())["workers"]]
        for n in (1, 2, 3)
    ]
    assert pids[2] == pids[1] and not set(pids[1]) & set(pids[0]), pids
    summary = (sweep_dir / "summary.md").read_text()
    assert "trainer.workers=2 optimizer.lr=0.1" in summary
    assert "sweep " in again.stdout and "| 3   |" in again.stdout  # the table, printed


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_and_reruns(ray_address: str, tmp_path: Path) -> None:
    """Job 0 names a model module that is not there yet (a file not copied, say); job 1 runs.
    The sweep exits 1 with job 0 marked; once the file exists the same sweep runs only job 0."""
    sweep_dir = tmp_path / "sweep"
    overrides = [
        "--multirun",
        "model._target_=tiny_model.make,distrain.models.mlp.MLP",
        "model.hidden_sizes=[16]",
        "trainer.workers=1",
        "trainer.epochs=1",
        "trainer.max_steps=3",
        "logger.progress=none",
        f"cluster.address={ray_address}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    first = run_cli(*overrides, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "distrain: job 0 (" in first.stderr and "failed: configuration error" in first.stderr
    assert "tiny_model" in json.loads((sweep_dir / "0" / "failed.json").read_text())["error"]
    assert _finished(sweep_dir / "1")
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["FAILED", "finished"]
    assert "FAILED: configuration error" in first.stdout

    # The driver imports it from its working directory, Ray's workers from the same path.
    (tmp_path / "tiny_model.py").write_text(
        "from distrain.models.mlp import MLP\n\n\ndef make(**kwargs):\n    return MLP(**kwargs)\n"
    )
    second = run_cli(*overrides, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (sweep_dir / "0" / "failed.json").exists()
    assert _finished(sweep_dir / "0")
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["finished", "skipped (finished before)"]


@pytest.mark.slow
def test_optuna_search_runs_trials_and_summarises(ray_address: str, tmp_path: Path) -> None:
    """hparams_search=optuna: Hydra's Optuna sweeper picks the values, distrain's return value
    (val_loss) is its objective. hydra-optuna-sweeper comes with the dev extras."""
    sweep_dir = tmp_path / "search"
    result = run_cli(
        "--multirun",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=3",
        "trainer.epochs=1",
        "logger.progress=none",
        f"cluster.address={ray_address}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["finished", "finished"]
    losses = [json.loads((sweep_dir / str(n) / "metrics.json").read_text()) for n in (0, 1)]
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {min(m['val_loss'] for m in losses)}" in best
    for row in rows:
        assert any(o.startswith("optimizer.lr=") for o in row["overrides"])

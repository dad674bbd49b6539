"""One real Ray per pytest process (`make test` runs two); CLI tests join it rather than start one.

Ray is started by this (pytest) process and shut down at the end of the session, so every Ray
process the suite starts is a child of ray.init here and goes away with ray.shutdown().
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import ray

from distrain.cli import CONF_DIR, compose_job  # noqa: F401 (tests import it from here)
from distrain.ray_startup import embedded_start

REPO = Path(__file__).resolve().parent.parent
DISTRAIN = [sys.executable, "-m", "distrain"]
# Logical CPUs: 4 workers must fit for the tests on a 2-core machine (they are small).
SESSION_CPUS = 4


@pytest.fixture(scope="session")
def ray_address() -> Any:
    # Ray's workers inherit this process's environment: with the repository on PYTHONPATH they
    # import test-only modules (tests/usermodel.py), as a user's workers import the user's code.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    # Ray starts idle Python workers for the first driver to connect, ahead of any task. The
    # suite's actors hardly use them (most are another driver's), and each one idles at about
    # 0.8 % of a core for the whole session: measured 0.25 CPU-s per 30 s, two per Ray. Set in
    # the environment, it reaches every Ray the suite starts (this one, the CLI's, the clusters').
    os.environ["RAY_prestart_worker_first_driver"] = "0"  # noqa: SIM112 (Ray's spelling)
    # Started as distrain's embedded Ray is: its dashboard agent on a free port (the other
    # pytest process's Ray, or a test's, may hold Ray's default one), no dashboard process
    # (ray_startup.py).
    with embedded_start():
        ray.init(
            address="local",
            num_cpus=SESSION_CPUS,
            include_dashboard=False,
            logging_level="WARNING",
        )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def free_kept_workers() -> Iterator[None]:
    """The workers an in-process run kept (`keep_workers=True`) are freed after each file: the
    next file's runs, and Ray calls of its own, find the session's CPUs free."""
    yield
    from distrain import warm_workers

    warm_workers.release()


def slowed(rank: int, step_delay_s: float, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (this process's by default) with `rank` sleeping `step_delay_s` per step: a
    straggler made on purpose (distrain/simulate.py)."""
    return {**(os.environ if env is None else env), "DISTRAIN_SLOW_RANK": f"{rank}:{step_delay_s}"}


def run_cli(
    *overrides: str, cwd: Path, timeout_s: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m distrain <overrides>` in a subprocess, output captured, after
    `free_kept_workers_before` it."""
    free_kept_workers_before(overrides)
    return subprocess.run(
        [*DISTRAIN, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def free_kept_workers_before(overrides: Sequence[str]) -> None:
    """Before a CLI run (its command line's `overrides`) starts: the workers this process kept
    are freed if the run joins this process's Ray, as a driver in another process cannot use
    them and would find the CPUs they hold taken. A run that ends before it joins (bad input),
    or starts a Ray of its own, leaves them for this file's next in-process job."""
    from distrain import warm_workers

    if ray.is_initialized() and _joins(ray.get_runtime_context().gcs_address, overrides):
        warm_workers.release()


def _joins(address: str, overrides: Sequence[str]) -> bool:
    """Whether a CLI run with these overrides joins the Ray at `address` (a resumed run may take
    it from the run it resumes)."""
    return f"cluster.address={address}" in overrides or any(
        o.startswith("resume=") for o in overrides
    )


def distrain_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`distrain ARGV` in this process (the export and sample subcommands need no Ray): its
    exit code."""
    from distrain import cli

    monkeypatch.setattr(sys, "argv", ["distrain", *argv])
    try:
        cli.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# The job the multi-node tests (test_cluster.py, test_two_hosts.py) run on two nodes and compare
# with one node.
TWO_WORKER_JOB = [
    "trainer.workers=2",
    "trainer.epochs=2",
    "optimizer.lr=0.05",
    "model.hidden_sizes=[32,32]",
    "logger.progress=plain",
]


@pytest.fixture(scope="session")
def one_node_run(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TWO_WORKER_JOB on the session's one-node Ray, run once: what a two-node run must equal."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    result = run_cli(
        f"cluster.address={ray_address}",
        *TWO_WORKER_JOB,
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def processes_mentioning(text: str) -> list[int]:
    """The pids of the processes whose command line contains `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie (ended, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, before or while it was read
        return False


def stop_ray_started_here(
    started: Sequence[subprocess.Popen], ray_tmp: Path, signal_: int = signal.SIGTERM
) -> list[int]:
    """Stop the Ray a test started with `ray start --block` (which stops the processes it
    started on `signal_`), last started first, by pid; then `reap_processes_mentioning(ray_tmp)`:
    the pids left behind, for the test to assert there were none."""
    for proc in reversed(started):
        proc.send_signal(signal_)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return reap_processes_mentioning(str(ray_tmp), timeout_s=30)


def reap_processes_mentioning(text: str, *, timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for every process whose command line contains `text` (a test's
    own temp dir: ours alone) to exit, then SIGKILL any left, so a failing test leaves no stray
    behind. Returns the pids that were left, for the test to assert there were none."""
    deadline = time.monotonic() + timeout_s
    while processes_mentioning(text) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = processes_mentioning(text)
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftover

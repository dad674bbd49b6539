"""The fork server started ahead by the `distrain` command (distrain/__main__.py), before it
imports Hydra and composes the job: taken by the job's Ray, stopped when the job starts none,
and never outliving the command; with real server processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from distrain import forked_workers
from distrain.__main__ import starts_embedded_ray
from tests.conftest import processes_mentioning, reap_processes_mentioning

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the fork server is Linux-only")


@pytest.fixture
def no_server_left() -> Iterator[None]:
    yield
    forked_workers.stop()


@pytest.mark.parametrize(
    ("argv", "starts"),
    [
        ([], True),  # the default job: an embedded Ray, workers forked
        (["trainer.workers=4", "cluster.address=null", "--multirun"], True),
        (["+cluster.fork_workers=true"], True),
        (["cluster.address=auto"], False),  # joins a cluster: its workers are Ray's
        (["cluster.address=ray://head:10001"], False),
        (["cluster.fork_workers=false"], False),
        (["cluster.fork_workers=False"], False),
        (["hydra/launcher=joblib", "-m"], False),  # the jobs run in other processes
        (["--help"], False),
        (["--cfg", "job"], False),
        (["-c", "job"], False),
        (["--version"], False),
        (["export", "outputs/run"], False),
        (["sample", "outputs/run"], False),
    ],
)
def test_only_a_command_line_that_runs_jobs_on_an_embedded_ray_starts_one_ahead(
    argv: list[str], starts: bool
) -> None:
    assert starts_embedded_ray(argv) is starts


@linux_only
def test_the_server_started_ahead_is_the_one_the_jobs_ray_takes(no_server_left: None) -> None:
    forked_workers.start_ahead()
    ahead = forked_workers._server
    assert ahead is not None
    address = forked_workers.start()
    assert address is not None
    assert forked_workers._server is ahead and ahead.poll() is None  # taken, not started again
    forked_workers.stop_ahead()  # taken: stop_ahead leaves it to its Ray
    assert ahead.poll() is None
    forked_workers.stop()
    assert ahead.returncode is not None


@linux_only
def test_a_server_started_ahead_for_a_job_that_starts_no_ray_is_stopped(
    no_server_left: None,
) -> None:
    forked_workers.start_ahead()
    ahead = forked_workers._server
    assert ahead is not None
    forked_workers.stop_ahead()
    assert forked_workers._server is None and ahead.returncode is not None
    # The next Ray's start starts a server of its own.
    assert forked_workers.start() is not None
    assert forked_workers._server is not None and forked_workers._server.pid != ahead.pid


@linux_only
def test_a_server_started_ahead_ends_with_its_command_even_while_it_imports() -> None:
    """A command that ends early (a mistake in the job, reported before any Ray) takes its
    server with it at once, while the server still imports torch (its stdin's end is read only
    after the imports: seconds later)."""
    command = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, select; from distrain import forked_workers as servers; "
            "servers.start_ahead(); select.select([servers._listening], [], [], 60); "
            "print(servers._server.pid, flush=True); os._exit(2)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = int(command.stdout.readline())
    assert command.wait(timeout=60) == 2
    deadline = time.monotonic() + 1.5
    while processes_mentioning(f"distrain-fork-{command.pid}-") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reap_processes_mentioning(f"distrain-fork-{command.pid}-", timeout_s=0) == [], (
        f"the server {server_pid} outlived its command"
    )

"""The fork server and its client (distrain/forked_workers.py, distrain/fork_client.py), with
real processes: the client is run as the raylet runs it, in front of a command shaped like Ray's
(`setup_worker.py ... default_worker.py ARGS`), whose `default_worker.py` here is a script that
reports what it was given."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distrain import fork_client, forked_workers
from tests.conftest import process_alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork server is Linux-only")

REPORTING_WORKER = """
import gc, json, os, sys, time
report = {"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "cwd": os.getcwd(),
          "env": os.environ.get("GIVEN"), "runtime_env": os.environ.get("FROM_RUNTIME_ENV"),
          "forked_by": os.environ.get("DISTRAIN_FORKED_BY"), "torch": "torch" in sys.modules,
          "pydantic": "pydantic.v1.fields" in sys.modules, "ray": "ray" in sys.modules,
          "collector": gc.isenabled(), "frozen": gc.get_freeze_count()}
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
print("worker says hello", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(60)
if sys.argv[2] == "sigkill":
    os.kill(os.getpid(), 9)
sys.exit(int(sys.argv[2]))
"""
FALLBACK_SETUP = "import sys; print('ran by Ray itself:', sys.argv[1:]); sys.exit(5)\n"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    address = forked_workers.start()
    assert address is not None
    yield address
    forked_workers.stop()


@pytest.fixture
def ray_like(tmp_path: Path) -> Path:
    (tmp_path / "setup_worker.py").write_text(FALLBACK_SETUP)
    (tmp_path / "default_worker.py").write_text(REPORTING_WORKER)
    return tmp_path


def client(address: str, folder: Path, *worker_args: str, language: str = "PYTHON") -> list[str]:
    context = json.dumps({"env_vars": {"FROM_RUNTIME_ENV": "${GIVEN}-too"}})
    ray_command = [
        sys.executable,
        str(folder / "setup_worker.py"),
        f"--serialized-runtime-env-context={context}",
        f"--language={language}",
        str(folder / "default_worker.py"),
        *worker_args,
    ]
    return forked_workers.client_command(address, ray_command)


def wait_for(path: Path, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written in {timeout_s} s")


def test_a_forked_worker_runs_the_command_with_the_clients_env_cwd_and_streams(
    server: str, ray_like: Path
) -> None:
    report_path = ray_like / "report.json"
    done = subprocess.run(
        client(server, ray_like, str(report_path), "3"),
        env={**os.environ, "GIVEN": "yes"},
        cwd=ray_like,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr  # the worker's exit code, through the client
    assert done.stdout == "worker says hello\n"  # the client's stdout was the worker's
    report = json.loads(report_path.read_text())
    assert report["torch"] is True  # imported before the fork: not by this worker
    # So is what Ray's worker imports besides Ray (pydantic: its serialization context's), but
    # not Ray, which reads this worker's environment as it imports.
    assert (report["pydantic"], report["ray"]) == (True, False)
    # The server paused its collector while importing: the worker collects, but never walks
    # what the server imported (frozen: shared with the server, never copied).
    assert report["collector"] is True and report["frozen"] > 100_000, report
    assert report["ppid"] == int(report["forked_by"]) == forked_workers._server.pid  # forked
    assert report["argv"] == [str(ray_like / "default_worker.py"), str(report_path), "3"]
    assert (report["cwd"], report["env"]) == (str(ray_like), "yes")
    assert report["runtime_env"] == "yes-too"  # the runtime env's variables, expanded as Ray does


def test_a_killed_client_takes_its_worker_and_a_killed_worker_ends_its_client_so(
    server: str, ray_like: Path
) -> None:
    sleeper = subprocess.Popen(client(server, ray_like, str(ray_like / "a.json"), "sleep"))
    worker_pid = wait_for(ray_like / "a.json")["pid"]
    sleeper.kill()
    sleeper.wait(timeout=10)
    deadline = time.monotonic() + 10
    while process_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(worker_pid)  # reaped by the server, not left running

    killed = subprocess.run(
        client(server, ray_like, str(ray_like / "b.json"), "sigkill"), timeout=120
    )
    assert killed.returncode == -signal.SIGKILL  # the raylet sees what it would have seen


def test_without_a_server_or_for_another_language_ray_starts_the_worker_itself(
    server: str, ray_like: Path
) -> None:
    for address, language in (("distrain-fork-nobody-here", "PYTHON"), (server, "JAVA")):
        done = subprocess.run(
            client(address, ray_like, "x", "0", language=language),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 5, done.stderr  # Ray's own command ran: setup_worker.py
        assert done.stdout.startswith("ran by Ray itself:")
        assert f"--language={language}" in done.stdout


def test_a_client_gone_before_its_answer_takes_its_worker_and_the_server_serves_on(
    server: str, ray_like: Path
) -> None:
    """As when a job fails its checks while its Ray starts: the raylet ends, and with it a
    client whose worker the server is forking (the server once died of it, a traceback in the
    job's one-paragraph error)."""
    argv = client(server, ray_like, str(ray_like / "gone.json"), "sleep")[4:]  # Ray's part
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": str(ray_like)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # as fork_client asks
        conn.connect("\0" + server)
        socket.send_fds(conn, [fork_client.STATUS.pack(len(body))], [0, 1, 2])
        conn.sendall(body)
    # Closed before the answer: its worker, forked meanwhile, is killed and reaped.
    server_pid = forked_workers._server.pid
    deadline = time.monotonic() + 10
    while _children(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children(server_pid) == []
    done = subprocess.run(
        client(server, ray_like, str(ray_like / "next.json"), "0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert wait_for(ray_like / "next.json")["forked_by"] == str(server_pid)


def _children(pid: int) -> list[int]:
    """`pid`'s child processes that have not ended."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_alive(int(entry.name)):
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found

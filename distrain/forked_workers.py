"""Worker processes forked from one that has imported everything, instead of each importing it.

Every Ray worker process starts a Python, imports Ray (twice: Ray's `setup_worker.py`, then
`default_worker.py` in the process it execs), then, for a distrain actor, torch, torch._dynamo
(DDP's constructor imports it) and distrain: about 3 s of CPU per worker, one after the other
inside it, and started only once Ray is up. On a machine with few cores that is most of the
time from the command to the first step, and all of the time a replacement worker takes.

An embedded Ray (one this job starts on its own machine) gets a fork server instead: a process
started beside Ray, before `ray.init` (by the `distrain` command, before anything else:
`start_ahead`), that imports all of that once while Ray starts. The
raylet's command for a Python worker becomes `fork_client.py` (a standard-library script that
starts in milliseconds) in front of Ray's own command; the client asks the server for a worker,
and the server forks one that runs Ray's `default_worker.py` with the client's arguments,
environment, working directory and standard streams. torch is made for this: its DataLoader
forks worker processes after importing it, and nothing here has started a thread, a CUDA
context or a Ray connection before the fork.

The client stands in for the worker towards the raylet: it exits when the worker does, with its
status, and the worker is killed if the client is. A command the server does not run in-process
(another interpreter, a container, another language: a runtime_env's) is declined, and the client
becomes Ray's worker as Ray would have started it; so does one that finds no server.

Written by hand: Ray starts each worker as a new interpreter and has no fork server (its
`--worker-preload-modules` imports in every worker, still one after the other), and the
interpreter's own `multiprocessing` forkserver cannot hand a process to an outside parent.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from distrain import fork_client, startup_imports

log = logging.getLogger("distrain")

CLIENT = Path(__file__).with_name("fork_client.py")
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
REAP_EVERY_S = 0.05
LISTEN_TIMEOUT_S = 10.0  # from the server's start to its listening: an interpreter's start
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FORKED_ENV = "DISTRAIN_FORKED_BY"  # in a forked worker's environment: the server's pid
SERVER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from distrain.forked_workers import serve; serve(sys.argv[2], int(sys.argv[3]))"
)
_server: subprocess.Popen[bytes] | None = None
_address = ""  # the running server's
_listening: int | None = None  # the pipe it says it listens on, until `start` has heard it
_ahead = False  # started by `start_ahead` and not taken by a Ray yet
# The arguments of Ray's setup_worker.py that say how to start the worker (its own parser exits on
# `-h`, which in the server would end the server).
_SETUP_ARGS = argparse.ArgumentParser(add_help=False)
_SETUP_ARGS.add_argument("--serialized-runtime-env-context", default=None)
_SETUP_ARGS.add_argument("--language", default=None)


def start_ahead() -> None:
    """Start a fork server now, at a command's start, for the embedded Ray its job will probably
    start: its imports then run while this process imports its own and composes the job (on a
    machine of two cores, on the core that would wait), instead of after that. The job's `start`
    takes it; `stop_ahead` ends it if the job starts no such Ray."""
    global _ahead
    if sys.platform == "linux":
        stop()
        _spawn()
        _ahead = True


def start() -> str | None:
    """Start a fork server for the Ray about to be started in this process, or take the one
    started ahead; its address (None where this platform has none, or it did not start).
    `stop()` ends it, after that Ray."""
    global _ahead, _listening
    if sys.platform != "linux":
        return None
    if not (_ahead and _server is not None and _server.poll() is None):
        stop()
        _spawn()
    _ahead = False
    assert _listening is not None
    # Until it listens (tens of ms), a worker's client would find no server and start the
    # worker as Ray does; from then on, one that comes during the imports waits for them.
    with os.fdopen(_listening, "rb") as said:
        _listening = None
        ready, _, _ = select.select([said], [], [], LISTEN_TIMEOUT_S)
        if not ready or not said.read(1):
            log.debug("the fork server did not start: Ray starts its workers as usual")
            stop()
            return None
    return _address


def stop_ahead() -> None:
    """End the server `start_ahead` started if no Ray has taken it (the job joins a cluster, or
    its workers are not forked): a no-op otherwise."""
    if _ahead:
        stop()


def _spawn() -> None:
    global _server, _address, _listening
    _address = f"distrain-fork-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # whose server it is
    _listening, told = os.pipe()
    _server = subprocess.Popen(
        # The distrain this process runs, whatever the working directory holds.
        [sys.executable, "-c", SERVER_MAIN, str(PACKAGE_PARENT), _address, str(told)],
        stdin=subprocess.PIPE,  # closed when this process ends, whatever ends it: the server stops
        pass_fds=(told,),
    )
    os.close(told)


def stop() -> None:
    """End the fork server (a no-op when none runs); workers it forked end with it."""
    global _server, _ahead, _listening
    server, _server, _ahead = _server, None, False
    if _listening is not None:
        os.close(_listening)
        _listening = None
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def client_command(address: str, command: list[str]) -> list[str]:
    """Ray's worker `command` (interpreter first) started through this server's client."""
    return [command[0], "-S", str(CLIENT), address, *command[1:]]


# --- the server process --------------------------------------------------------------------------


def _import_everything() -> None:
    """What a distrain worker imports on the way to its first step, but Ray: Ray reads its
    settings from the environment once per process (RAY_JOB_ID, RAY_AUTH_MODE, ... as the
    raylet sets them for each worker), so each forked worker imports Ray itself, in its own
    environment: ~0.1 s of CPU here once the libraries Ray imports are (startup_imports.py),
    against ~2 s for the rest."""
    import hydra.utils  # noqa: F401
    import torch._dynamo
    import torch.nn.parallel  # noqa: F401

    import distrain.aggregators.base
    import distrain.build
    import distrain.data.batches
    import distrain.loop
    import distrain.models
    import distrain.shards
    import distrain.step  # noqa: F401

    startup_imports.import_ray_dependencies()


def _runnable(argv: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """Ray's `setup_worker.py` command as the arguments of `default_worker.py` to run here and
    the runtime env's variables; None if it needs another interpreter or language. (Read here
    as Ray's setup_worker.py reads it, without importing Ray.)"""
    if not argv or not argv[0].endswith("setup_worker.py"):
        return None
    args, remaining = _SETUP_ARGS.parse_known_args(argv[1:])
    context = json.loads(args.serialized_runtime_env_context or "{}")
    own = context.get("py_executable") in (sys.executable, None)
    plain = not context.get("override_worker_entrypoint") and not context.get("java_jars")
    if args.language != "PYTHON" or not own or not plain:
        return None
    if not remaining or not remaining[0].endswith("default_worker.py"):
        return None
    return remaining, dict(context.get("env_vars") or {})


def _update_envs(env_vars: dict[str, str]) -> None:
    """Ray's `update_envs` (setup_worker.py applies a runtime env's variables with it)."""
    for key, value in env_vars.items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))


def _child(
    conn: socket.socket, request: dict, fds: list[int], worker: tuple[list[str], dict[str, str]]
) -> None:
    """In the forked process: become the client's worker. Never returns."""
    import runpy

    worker_argv, env_vars = worker
    code = 1
    try:
        _die_with_parent()
        conn.close()
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _update_envs(env_vars)  # as Ray's setup_worker.py does before it execs the worker
        os.environ[FORKED_ENV] = str(os.getppid())
        sys.argv = worker_argv
        runpy.run_path(worker_argv[0], run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """This process gets `sig` when its parent ends: a worker is killed with its server, the
    server is stopped with its driver."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A client's request and its standard streams (fork_client.py's wire format)."""
    head, fds, _, _ = socket.recv_fds(conn, fork_client.STATUS.size, 3)
    if len(head) != fork_client.STATUS.size:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the client left before its request")
    (size,) = fork_client.STATUS.unpack(head)
    return json.loads(fork_client.receive_exactly(conn, size)), fds


def serve(address: str, listening_fd: int) -> None:
    """The fork server: listen (and say so on `listening_fd`), import, then fork one worker per
    client until told to stop."""
    # Ended with the process that started it even during the imports (its stdin's end is read
    # only after them): one started ahead outlives no mistake in the job that its parent reports.
    _die_with_parent(signal.SIGTERM)
    # Listening first: a client that comes while the imports run waits for them, in the backlog.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address)
    listener.listen(64)
    try:
        os.write(listening_fd, b"1")
    except BrokenPipeError:  # whoever started it has ended already
        return
    os.close(listening_fd)
    with startup_imports.collection_paused():  # imports make objects, no garbage
        _import_everything()
    # What is imported stays shared with the forked workers: frozen objects are never visited
    # by their collections, so their pages are not copied on write (the workers keep it so).
    gc.freeze()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # EOF: the driver has ended
    workers: dict[int, socket.socket] = {}  # pid -> its client's connection
    clients: dict[socket.socket, int] = {}
    stopping = False

    def stop_now(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_now)
    while not stopping:
        for key, _ in selector.select(REAP_EVERY_S):
            if key.fileobj is listener:
                _serve_client(listener, selector, workers, clients)
            elif key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 1024):
                    stopping = True
            else:  # a client's connection closed: its worker goes with it
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    closed = not conn.recv(16)
                except OSError:  # reset
                    closed = True
                if closed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(clients[conn], signal.SIGKILL)
                    selector.unregister(conn)
        _reap(workers, clients, selector)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while workers:
        _reap(workers, clients, selector, block=True)


def _serve_client(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    workers: dict[int, socket.socket],
    clients: dict[socket.socket, int],
) -> None:
    """The next client's request: declined, or its worker forked and its connection watched.
    A client may leave at any moment (its raylet ends: a job that failed its checks while Ray
    started); then it hears nothing, and its worker goes as when it leaves later."""
    conn, _ = listener.accept()
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError):
        conn.close()
        return
    worker = _runnable(request["argv"])
    if worker is None:
        with contextlib.suppress(OSError):
            conn.sendall(b"X")
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        for other in clients:
            other.close()
        _child(conn, request, fds, worker)
    for fd in fds:
        os.close(fd)
    workers[pid], clients[conn] = conn, pid
    selector.register(conn, selectors.EVENT_READ)  # reaped or killed: see `serve`
    try:
        conn.sendall(b"F")
    except OSError:  # the client has left
        os.kill(pid, signal.SIGKILL)  # not reaped yet: still this server's child


def _reap(
    workers: dict[int, socket.socket],
    clients: dict[socket.socket, int],
    selector: selectors.BaseSelector,
    *,
    block: bool = False,
) -> None:
    while workers:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = workers.pop(pid, None)
        if conn is None:
            continue
        clients.pop(conn, None)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):
            conn.sendall(fork_client.STATUS.pack(code))
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        conn.close()

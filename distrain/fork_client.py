"""The command an embedded Ray's raylet runs to start a Python worker (distrain/forked_workers.py).

    python -S fork_client.py ADDRESS <Ray's own worker command, without its interpreter>

Asks the fork server at the abstract Unix socket ADDRESS for a worker process forked from one
that has already imported Ray, torch and distrain, hands it this process's stdin, stdout and
stderr, then stands for it: it exits when the worker does, with its status, and the worker is
killed if this process is. Where there is no server, or it declines the command, this process
becomes Ray's worker as if Ray had started it (`execv` of the same command).

Standard library only, and run with `-S`: it starts in milliseconds, on any node.
"""

import json
import os
import signal
import socket
import struct
import sys

CONNECT_TIMEOUT_S = 30.0  # the server accepts once its imports are done: seconds on a busy node
# The wire format, the server's too (forked_workers.py imports it): the request's length (with
# the standard streams' descriptors), then the request; the answer, then the worker's status:
# >= 0 its exit code, < 0 the signal that ended it.
STATUS = struct.Struct("!i")


def _fall_back(command: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *command])


def receive_exactly(conn: socket.socket, size: int) -> bytes:
    """`size` bytes from `conn`; ConnectionError if the other side closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return data


def main() -> None:
    address, command = sys.argv[1], sys.argv[2:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.connect("\0" + address)
        request = json.dumps({"argv": command, "env": dict(os.environ), "cwd": os.getcwd()})
        body = request.encode()
        socket.send_fds(conn, [STATUS.pack(len(body))], [0, 1, 2])
        conn.sendall(body)
        answer = receive_exactly(conn, 1)
    except OSError:
        conn.close()
        _fall_back(command)
        return
    if answer != b"F":  # declined: a command it does not run in-process
        conn.close()
        _fall_back(command)
        return
    conn.settimeout(None)
    try:
        (status,) = STATUS.unpack(receive_exactly(conn, STATUS.size))
    except (OSError, ConnectionError):
        sys.exit(1)  # the server ended first: it took the worker with it
    if status < 0:  # end as the worker did, for whoever watches this process's status
        if -status != signal.SIGKILL:  # the one signal with no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


if __name__ == "__main__":
    main()

"""Joining a cluster: which Ray Client failures are worth one more connection, and how a
cluster that refuses this process is named."""

import sys

import pytest
import ray

from distrain.cluster import client_server_died, version_mismatch

# What Ray Client's `ray.init` raises when the head's per-connection server died (the text of
# ray/util/client/worker.py's ConnectionAbortedError around ray/util/client/server/proxier.py's
# RuntimeError), as distrain's CI saw it.
SERVER_DID_NOT_START = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File ".../ray/util/client/server/proxier.py", line 772, in Datapath\n'
    "    raise RuntimeError(\nRuntimeError: Starting Ray client server failed. See "
    "ray_client_server_23000.err for detailed logs.\n"
)
DIED_WHILE_CHECKED = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File ".../ray/util/client/server/proxier.py", line 765, in Datapath\n'
    "    if not self.proxy_manager.start_specific_server(\n"
    '  File ".../ray/util/client/server/proxier.py", line 396, in start_specific_server\n'
    "    cmd = psutil_proc.cmdline()\n"
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=1718)\n"
)
NO_BACKEND = (
    "Initialization failure from server:\nRuntimeError: Proxy failed to Connect to backend! "
    "Check `ray_client_server.err` and `ray_client_server_23000.err` on the head node"
)

JOB_ENV_FAILED = "Initialization failure from server:\nRuntimeEnvSetupError: working_dir ..."


@pytest.mark.parametrize(
    ("address", "message", "retry"),
    [
        ("ray://10.0.0.1:10001", SERVER_DID_NOT_START, True),
        ("ray://10.0.0.1:10001", DIED_WHILE_CHECKED, True),
        ("ray://10.0.0.1:10001", NO_BACKEND, True),
        # Not Ray Client: a GCS address has no per-connection server to die.
        ("10.0.0.1:6379", SERVER_DID_NOT_START, False),
        # The job's own runtime env, a refused connection: a new connection changes nothing.
        ("ray://10.0.0.1:10001", JOB_ENV_FAILED, False),
        ("ray://10.0.0.1:10001", "Connection refused", False),
        (None, SERVER_DID_NOT_START, False),
    ],
)
def test_only_a_dead_client_server_is_worth_connecting_again(
    address: str | None, message: str, retry: bool
) -> None:
    assert client_server_died(address, ConnectionAbortedError(message)) is retry


def test_a_cluster_of_other_versions_is_named_in_one_paragraph() -> None:
    """Ray's own refusal (its check, its words) becomes one paragraph naming both sides."""
    from ray._private.utils import check_version_info

    with pytest.raises(RuntimeError) as refused:
        check_version_info(
            {"ray_version": "2.9.3", "python_version": "3.10.4"}, "node 10.0.0.7", True, "patch"
        )
    message = version_mismatch("10.0.0.5:6379", str(refused.value))
    own_python = ".".join(map(str, sys.version_info[:3]))
    assert message.startswith(
        "could not join the Ray cluster at '10.0.0.5:6379': it runs Ray 2.9.3 on Python 3.10.4, "
        f"this process Ray {ray.__version__} on Python {own_python}"
    ), message
    assert "\n" not in message and "ray start --head" in message
    # Worded otherwise by another Ray: still one paragraph, with Ray's words in it.
    other = version_mismatch("auto", "Version mismatch:\n  cluster 2.9.3/3.10\n  here 2.60/3.11\n")
    assert "Version mismatch: cluster 2.9.3/3.10 here 2.60/3.11, and Ray joins" in other
    assert "\n" not in other

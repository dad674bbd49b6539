"""Joining a cluster that asks for Ray's token (distrain/ray_auth.py), against a real
`ray start --head` with token authentication on, as a user gets one: Ray turns it on for a head
wherever a token exists on the machine (an embedded Ray makes one in ~/.ray/auth_token).

Before: `ray.init` got no token from ~/.ray/auth_token, printed "Failed to get cluster ID from
GCS server: Unauthenticated" once a second for 20 s and ended with "Failed to connect to Ray
cluster at ...", naming neither the token nor what to set.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DISTRAIN, REPO, stop_ray_started_here
from tests.test_cluster import _free_port

pytestmark = pytest.mark.slow  # a Ray head of its own starts: ~10 s
RAY = str(Path(sys.executable).with_name("ray"))
RAY_SAID_NO = "Failed to get cluster ID from GCS server"  # ray.init's retry line


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with no Ray auth setting of its own, HOME at `home`."""
    unset = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`ray start --head` where a token exists (HOME/.ray/auth_token): token auth is on."""
    home = tmp_path_factory.mktemp("home-with-token")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    ray_tmp = Path(tempfile.mkdtemp(prefix="dtt-", dir="/tmp"))  # Ray's socket paths: short
    port = _free_port()
    head = subprocess.Popen(
        [
            *(RAY, "start", "--head", f"--port={port}", "--num-cpus=1"),
            *("--include-dashboard=false", "--disable-usage-stats", "--block"),
        ],
        env=_env(home, RAY_TMPDIR=str(ray_tmp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"127.0.0.1:{port}"
        _wait_until_up(address, home, head)
        yield {"address": address, "home": home}
    finally:
        leftover = stop_ray_started_here([head], ray_tmp)
        assert leftover == [], f"processes left behind by the head: {leftover}"


def _wait_until_up(address: str, home: Path, head: subprocess.Popen) -> None:
    """Until the head's GCS answers, and asks for a token (the premise of these tests)."""
    from distrain import ray_auth

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, f"`ray start --head` exited with {head.returncode}"
        with contextlib.suppress(Exception):
            if not ray_auth.accepted(address, None, timeout_s=2):
                return
        time.sleep(0.5)
    raise AssertionError("the head never asked for a token")


def _join(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """distrain's own join (the CLI's `cluster.connect`), then one Ray call, in a process of its
    own: a whole job would add nothing here but minutes."""
    code = (
        "import sys, ray\n"
        "from distrain import cluster\n"
        "from distrain.config import ClusterConfig\n"
        "with cluster.connect(ClusterConfig(address=sys.argv[1])):\n"
        "    print('CPUs', ray.cluster_resources()['CPU'])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


def test_the_token_on_this_machine_joins_with_no_setting(token_head: dict[str, Any]) -> None:
    """RAY_AUTH_MODE unset, the token in ~/.ray/auth_token: joined, as `ray status` would."""
    joined = _join(token_head["address"], _env(token_head["home"]))
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "CPUs 1.0" in joined.stdout
    assert RAY_SAID_NO not in joined.stderr


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no token", "and this process has none: RAY_AUTH_TOKEN is unset and there is no token"),
        ("a wrong token", "and refused this process's token (from RAY_AUTH_TOKEN)"),
        ("RAY_AUTH_MODE=disabled", "and RAY_AUTH_MODE=disabled here keeps this process from"),
    ],
)
def test_a_missing_or_wrong_token_is_named_before_ray_init(
    token_head: dict[str, Any], tmp_path: Path, case: str, expected: str
) -> None:
    """One paragraph naming the address and what to do, exit 2, and no ray.init retries."""
    env = {
        "no token": _env(tmp_path),  # a HOME with no ~/.ray/auth_token
        "a wrong token": _env(token_head["home"], RAY_AUTH_TOKEN=secrets.token_hex(32)),
        "RAY_AUTH_MODE=disabled": _env(token_head["home"], RAY_AUTH_MODE="disabled"),
    }[case]
    address = token_head["address"]
    result = subprocess.run(
        [*DISTRAIN, f"cluster.address={address}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"distrain: configuration error: cluster.address='{address}': the Ray cluster at "
        f"{address} requires its authentication token"
    ), result.stderr[-3000:]
    assert expected in message
    if case != "RAY_AUTH_MODE=disabled":
        assert "`ray get-auth-token` on the head prints it; set RAY_AUTH_TOKEN" in message
    assert RAY_SAID_NO not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()

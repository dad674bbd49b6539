"""One real Ray for the whole session; CLI tests join it as a cluster instead of starting their own.

Ray is started by this (pytest) process and shut down at the end of the session, so every Ray
process the suite starts is a child of ray.init here and goes away with ray.shutdown().
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray

from distrain.cli import CONF_DIR, compose_job  # noqa: F401 (tests import it from here)

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
    ray.init(
        address="local", num_cpus=SESSION_CPUS, include_dashboard=False, logging_level="WARNING"
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def run_cli(
    *overrides: str, cwd: Path, timeout_s: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m distrain <overrides>` in a subprocess, output captured."""
    return subprocess.run(
        [*DISTRAIN, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )

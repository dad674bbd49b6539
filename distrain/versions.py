"""`distrain --version`: distrain's version and those of what it runs on, for a bug report.

Read from the installed packages' metadata and files, never by importing them: it answers at once.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from distrain.rundir import git_revision


def describe(source_dir: Path) -> str:
    """Two lines: distrain (with the git revision of `source_dir`, for a source checkout), then
    python and the stack."""
    revision = git_revision(source_dir) if (source_dir / ".git").exists() else None
    torch = torch_build() or installed("torch")
    others = ", ".join(f"{p} {installed(p)}" for p in ("ray", "hydra-core", "tensorboard"))
    return (
        f"distrain {installed('distrain')}{f' (git {revision})' if revision else ''}\n"
        f"python {sys.version.split()[0]}, torch {torch}, {others}"
    )


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def torch_build() -> str | None:
    """torch's version with its build tag (2.14.1+cu130, +cpu), which the wheel's metadata
    lacks: which CUDA a torch was built for is the first question about a GPU problem. Read as
    text from torch/version.py, which torch's build generates; nothing of torch is imported."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        source = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", source, re.MULTILINE)
    return found.group(1) if found else None

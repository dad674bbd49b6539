"""Checkpoints on disk: atomic writes, a `latest` pointer, the last K kept, safe loading.

The driver writes them (workers send their state through the object store), so the run dir only
has to exist on the driver's machine: no shared filesystem is needed across a cluster.
A checkpoint holds only tensors and plain values and is read with `torch.load(weights_only=True)`:
a checkpoint file is data, not code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from distrain.config import ConfigError

FORMAT_VERSION = 1
NAME = re.compile(r"^step-(\d{9})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "epoch", "step_in_epoch", "model", "optimizer")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Temporary file, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointStore:
    """`<run dir>/checkpoints/step-000000123.pt` files and the `latest` pointer."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def save(self, payload: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{payload['step']:09d}.pt"
        _atomic_write(
            path, lambda handle: torch.save({**payload, "format_version": FORMAT_VERSION}, handle)
        )
        _atomic_write(self.directory / "latest", lambda handle: handle.write(path.name.encode()))
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def all(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if NAME.match(p.name))

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            path = self.directory / pointer.read_text().strip()
            if path.is_file():
                return path
        files = self.all()  # no pointer yet (or it names a deleted file): newest on disk
        return files[-1] if files else None


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint, or raise ConfigError saying which file and what is wrong with it."""
    others = [p.name for p in CheckpointStore(path.parent, keep=0).all() if p != path]
    alternatives = (
        f" Older checkpoints in {path.parent}: {', '.join(others)}; resume from one with "
        f"resume={path.parent / others[-1]}."
        if others
        else ""
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist.{alternatives}") from None
    except Exception as error:  # truncated zip, garbage bytes, a pickle with code in it
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}): the file is truncated, corrupt or not a "
            f"distrain checkpoint.{alternatives}"
        ) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ConfigError(
            f"checkpoint {path} is not a distrain checkpoint (missing {', '.join(missing)})."
            f"{alternatives}"
        )
    if payload["format_version"] > FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has format version {payload['format_version']}, newer than this "
            f"distrain reads ({FORMAT_VERSION}): upgrade distrain."
        )
    return payload


def resolve_resume(target: str) -> Path:
    """`resume=` accepts a run dir, its checkpoints/ dir, or one checkpoint file."""
    path = Path(target).expanduser().resolve()
    if path.is_file():
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointStore(directory, keep=0).latest()
        if latest is not None:
            return latest
    raise ConfigError(
        f"resume={target}: no checkpoint found (looked for {path}/checkpoints/step-*.pt). "
        "Name a run directory that has checkpoints, or one checkpoint file."
    )

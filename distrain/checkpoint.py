"""Checkpoints on disk: sharded, atomic, a `latest` pointer, the last K kept, safe to load.

A checkpoint is a directory `<run dir>/checkpoints/step-000000123/`:

    meta.json                              plain data: step, data position, schedule, job,
                                           history, and the index of every tensor's pieces
    shard-00000-of-00002.safetensors       the tensors rank 0 wrote (distrain/shards.py)
    shard-00001-of-00002.safetensors       ... rank 1's

The shards are written in parallel into a hidden temporary directory that is renamed into place
once complete, so a reader sees a whole checkpoint or none. The driver writes them (workers send
their shares through Ray's object store), so the run dir only has to exist on the driver's
machine: no shared filesystem is needed across a cluster. Nothing is unpickled on load: JSON and
safetensors are data, not code. Checkpoints of format 1 (one `step-*.pt` file, read with
`torch.load(weights_only=True)`) still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distrain.config import ConfigError

FORMAT_VERSION = 2
NAME = re.compile(r"^step-(\d{9})(\.pt)?$")
META = "meta.json"
REQUIRED_KEYS = ("format_version", "step", "epoch", "step_in_epoch", "tensors", "shards")
V1_REQUIRED_KEYS = ("format_version", "step", "epoch", "step_in_epoch", "model", "optimizer")
MAX_WRITERS = 8  # parallel shard writes

Tensors = dict[str, torch.Tensor]


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_shard(path: Path, tensors: Tensors) -> int:
    save_file(tensors, str(path))
    _fsync(path)
    return path.stat().st_size


@dataclass
class Saved:
    path: Path
    size_bytes: int


class CheckpointStore:
    """`<run dir>/checkpoints/step-000000123/` directories, the `latest` pointer, and the `best`
    pointer (the checkpoint of the lowest validation loss, kept beside the last `keep`)."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep
        # The background writer rotates while the driver's loop marks the best: one at a time,
        # so a checkpoint just marked is never removed as an old one.
        self._rotating = threading.Lock()

    def save(self, meta: dict[str, Any], shards: list[Callable[[], Tensors]]) -> Saved:
        """Write `meta` and the shards (each fetched by its callable, in parallel)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{meta['step']:09d}"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            names = [shard_name(rank, len(shards)) for rank in range(len(shards))]

            def write(rank: int) -> int:
                return _write_shard(tmp / names[rank], shards[rank]())

            with ThreadPoolExecutor(min(len(shards), MAX_WRITERS)) as pool:
                size_bytes = sum(pool.map(write, range(len(shards))))
            record = {**meta, "format_version": FORMAT_VERSION, "shards": names}
            _atomic_write(tmp / META, json.dumps(record, indent=1).encode())
            self._publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _atomic_write(self.directory / "latest", final.name.encode())
        self._rotate()
        return Saved(final, size_bytes + len(json.dumps(record)))

    def _rotate(self) -> None:
        """Remove all but the last `keep` checkpoints and the best one."""
        with self._rotating:
            best = self.best()
            for old in self.all()[: -self.keep]:
                if old != best:
                    _remove(old)

    def mark_best(self, step: int) -> Path | None:
        """Point `best` at the checkpoint of `step` (None, and no change: it is not on disk);
        the previous best is then an ordinary checkpoint again, rotated out when old."""
        with self._rotating:
            path = self.directory / f"step-{step:09d}"
            if not path.is_dir():
                return None
            _atomic_write(self.directory / "best", path.name.encode())
        self._rotate()
        return path

    def best(self) -> Path | None:
        return self._pointed("best")

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete directory into place (replacing one of the same step, which a
        run resumed from an earlier checkpoint writes again)."""
        if final.exists():
            stale = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, stale)
            os.replace(tmp, final)
            _remove(stale)
        else:
            os.replace(tmp, final)
        _fsync(self.directory)

    def all(self) -> list[Path]:
        """Checkpoints (directories, or format-1 files), oldest first."""
        if not self.directory.is_dir():
            return []
        found = (p for p in self.directory.iterdir() if NAME.match(p.name))
        return sorted(found, key=lambda p: p.name.removesuffix(".pt"))

    def latest(self) -> Path | None:
        pointed = self._pointed("latest")
        if pointed is not None:
            return pointed
        found = self.all()  # no pointer yet (or it names a deleted one): newest on disk
        return found[-1] if found else None

    def _pointed(self, pointer_name: str) -> Path | None:
        pointer = self.directory / pointer_name
        if pointer.is_file():
            path = self.directory / pointer.read_text().strip()
            if path.exists():
                return path
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its plain data, and its shards' tensors on demand."""

    path: Path
    meta: dict[str, Any]
    shards: list[Callable[[], Tensors]]

    @property
    def step(self) -> int:
        return self.meta["step"]


def load(path: Path) -> Checkpoint:
    """Read a checkpoint's metadata and check its shards, or raise ConfigError saying which
    checkpoint and what is wrong with it (naming older ones to resume from instead)."""
    others = [p.name for p in CheckpointStore(path.parent, keep=0).all() if p != path]
    alternatives = (
        f" Older checkpoints in {path.parent}: {', '.join(others)}; resume from one with "
        f"resume={path.parent / others[-1]}."
        if others
        else ""
    )
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist.{alternatives}")
    try:
        checkpoint = _load_dir(path) if path.is_dir() else _load_v1(path)
    except ConfigError as error:
        raise ConfigError(f"{error}{alternatives}") from None
    except Exception as error:  # truncated, garbage bytes, a pickle with code in it
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}): it is truncated, "
            f"corrupt or not a distrain checkpoint.{alternatives}"
        ) from None
    version = checkpoint.meta["format_version"]
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has format version {version}, newer than this distrain reads "
            f"({FORMAT_VERSION}): upgrade distrain."
        )
    return checkpoint


def _load_dir(path: Path) -> Checkpoint:
    meta = json.loads((path / META).read_text())
    _require(path, meta, REQUIRED_KEYS)
    files = [path / name for name in meta["shards"]]
    for number, file in enumerate(files):
        with safe_open(str(file), framework="pt") as handle:  # reads the header only
            held = set(handle.keys())
        for key, entry in meta["tensors"].items():
            wanted = [p for p in entry["pieces"] if p["shard"] == number]
            if wanted and key not in held:
                raise ConfigError(f"checkpoint {path}: {file.name} lacks {key}.")
    _check_coverage(path, meta["tensors"])
    return Checkpoint(path, meta, [lambda file=file: load_file(str(file)) for file in files])


def _check_coverage(path: Path, index: dict[str, dict[str, Any]]) -> None:
    """Every tensor's pieces cover its rows exactly once: no shard is missing."""
    for key, entry in index.items():
        if not entry["shape"]:
            continue
        covered = 0
        for first, last in sorted(p["rows"] for p in entry["pieces"]):
            if first != covered:
                raise ConfigError(f"checkpoint {path}: rows {covered}-{first} of {key} missing.")
            covered = last
        if covered != entry["shape"][0]:
            raise ConfigError(f"checkpoint {path}: {key} has {covered} of its rows.")


def _require(path: Path, meta: Any, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(
            f"checkpoint {path} is not a distrain checkpoint (missing {', '.join(missing)})."
        )


def _load_v1(path: Path) -> Checkpoint:
    """A format-1 file (the full state in one `torch.save`) as one shard of format 2."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    _require(path, payload, V1_REQUIRED_KEYS)
    tensors: Tensors = {}
    index: dict[str, dict[str, Any]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        tensors[key] = value
        rows = [0, value.shape[0]] if value.dim() else None
        dtype = str(value.dtype).removeprefix("torch.")
        index[key] = {
            "shape": list(value.shape),
            "dtype": dtype,
            "pieces": [{"shard": 0, "rows": rows}],
        }

    for name, value in payload["model"].items():
        add(f"model/{name}", value)
    values: dict[str, dict[str, Any]] = {}
    for number, state in payload["optimizer"]["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                add(f"optimizer/{number}/{name}", value)
            else:
                values.setdefault(str(number), {})[name] = value
    for rank, rng in enumerate(payload.get("rng") or []):
        for kind, value in rng.items():
            if value is not None:
                add(f"rng/{rank}/{kind}", value)
    groups = payload["optimizer"]["param_groups"]
    meta = {
        **{k: v for k, v in payload.items() if k not in ("model", "optimizer", "rng")},
        "optimizer": {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
            "group_sizes": [len(g["params"]) for g in groups],
            "values": values,
        },
        "tensors": index,
        "shards": [path.name],
        "world_size": payload.get("world_size", len(payload.get("rng") or [])),
    }
    return Checkpoint(path, meta, [lambda: tensors])


def resolve_resume(target: str) -> Path:
    """`resume=` accepts a run dir, its checkpoints/ dir, one checkpoint (dir or file), or a
    pointer to one (checkpoints/latest, checkpoints/best)."""
    path = Path(target).expanduser().resolve()
    if path.name in ("latest", "best") and path.is_file():  # a pointer: the checkpoint it names
        path = path.parent / path.read_text().strip()
    if path.is_file() or (path / META).is_file():
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointStore(directory, keep=0).latest()
        if latest is not None:
            return latest
    raise ConfigError(
        f"resume={target}: no checkpoint found (looked for {path}/checkpoints/step-*). "
        "Name a run directory that has checkpoints, or one checkpoint."
    )

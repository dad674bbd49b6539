"""Checkpoints are data, never code: a pickle that would run a command is refused, unrun."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrain import checkpoint
from distrain.config import ConfigError
from tests.conftest import DISTRAIN


class _RunsACommand:
    """Unpickling this runs `touch <marker>`: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _trapped_checkpoint(directory: Path, marker: Path) -> Path:
    """A file that looks like a distrain checkpoint, with the trap inside the optimizer state."""
    path = directory / "checkpoints" / "step-000000010.pt"
    path.parent.mkdir(parents=True)
    payload = {
        "format_version": checkpoint.FORMAT_VERSION,
        "step": 10,
        "epoch": 0,
        "step_in_epoch": 10,
        "model": {"weight": torch.zeros(2)},
        "optimizer": {"state": {"trap": _RunsACommand(marker)}},
    }
    torch.save(payload, path)
    (path.parent / "latest").write_text(path.name)
    return path


def test_the_trap_is_real(tmp_path: Path) -> None:
    """Control: loaded as a plain pickle, the file does run its command."""
    marker = tmp_path / "ran"
    path = _trapped_checkpoint(tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loading_refuses_the_pickle_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _trapped_checkpoint(tmp_path, marker)
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(path)
    assert not marker.exists()


def test_resume_from_a_trapped_checkpoint_fails_cleanly_before_any_actor(tmp_path: Path) -> None:
    """Through the CLI: exit 2, one paragraph naming the file, no traceback, nothing run.
    cluster.address names a port nothing listens on: reaching Ray would fail differently."""
    marker = tmp_path / "ran"
    _trapped_checkpoint(tmp_path / "run", marker)
    result = subprocess.run(
        [*DISTRAIN, f"resume={tmp_path / 'run'}", "cluster.address=127.0.0.1:1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "step-000000010.pt cannot be read" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def _sharded_checkpoint(directory: Path) -> Path:
    """A real format-2 checkpoint (one tensor over two shards), written by the store."""
    from distrain.checkpoint import CheckpointStore

    pieces = [{"shard": 0, "rows": [0, 1]}, {"shard": 1, "rows": [1, 2]}]
    meta = {
        "step": 10,
        "epoch": 0,
        "step_in_epoch": 10,
        "tensors": {"model/weight": {"shape": [2], "dtype": "float32", "pieces": pieces}},
    }
    halves = [lambda: {"model/weight": torch.zeros(1)}, lambda: {"model/weight": torch.ones(1)}]
    return CheckpointStore(directory / "checkpoints", keep=3).save(meta, halves).path


@pytest.mark.parametrize("part", ["meta.json", "shard-00001-of-00002.safetensors"])
def test_a_pickle_in_a_sharded_checkpoint_is_refused_unrun(tmp_path: Path, part: str) -> None:
    """Format 2 holds JSON and safetensors: a pickle put in place of either is not data."""
    path = _sharded_checkpoint(tmp_path)
    assert checkpoint.load(path).step == 10  # the untouched checkpoint loads
    marker = tmp_path / "ran"
    torch.save({"trap": _RunsACommand(marker)}, path / part)
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_dcp_style_pickled_metadata_file_is_never_read(tmp_path: Path) -> None:
    """torch's distributed checkpoint keeps its index in a pickled `.metadata`; ours is JSON, so
    such a file beside the shards is ignored, whatever it would run."""
    path = _sharded_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps({"trap": _RunsACommand(marker)}))
    loaded = checkpoint.load(path)
    assert [read()["model/weight"].tolist() for read in loaded.shards] == [[0.0], [1.0]]
    assert not marker.exists()

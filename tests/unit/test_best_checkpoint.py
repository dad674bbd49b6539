"""The best checkpoint: kept through rotation while it is the best, and exported on its own.

Real files: checkpoints written by `CheckpointStore.save`, read back by `distrain export`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distrain import checkpoint, cli
from distrain.checkpoint import CheckpointStore
from distrain.shards import chunk_rows
from tests.conftest import compose_job


def _save(store: CheckpointStore, step: int, state: dict[str, torch.Tensor], shards: int = 2):
    """`state` as `shards` workers write it: each tensor split by rows."""
    index, pieces = {}, [{} for _ in range(shards)]
    for name, tensor in state.items():
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).split(".")[1]}
        entry["pieces"] = []
        for rank in range(shards):
            first, last = chunk_rows(len(tensor), rank, shards)
            pieces[rank][f"model/{name}"] = tensor[first:last].clone()
            entry["pieces"].append({"shard": rank, "rows": [first, last]})
        index[f"model/{name}"] = entry
    meta = {"step": step, "epoch": 0, "step_in_epoch": step, "tensors": index}
    return store.save(meta, [lambda piece=piece: piece for piece in pieces])


def test_the_best_is_kept_beside_the_last_ones_until_a_better_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    state = {"w": torch.zeros(4)}
    for step in (1, 2):
        _save(store, step, state)
    assert store.mark_best(1) == tmp_path / "step-000000001"
    for step in (3, 4):
        _save(store, step, state)
    names = [path.name for path in store.all()]
    assert names == ["step-000000001", "step-000000003", "step-000000004"]  # 2 rotated out
    assert store.best() == tmp_path / "step-000000001" and store.latest().name.endswith("4")
    # A better one: the old best is an ordinary old checkpoint again, and goes.
    assert store.mark_best(4) == tmp_path / "step-000000004"
    assert [path.name for path in store.all()] == ["step-000000003", "step-000000004"]
    # A step no longer on disk cannot become the best: the pointer stays.
    assert store.mark_best(2) is None and store.best() == tmp_path / "step-000000004"
    # `resume=` takes either pointer.
    assert checkpoint.resolve_resume(str(tmp_path / "best")) == tmp_path / "step-000000004"
    assert checkpoint.resolve_resume(str(tmp_path / "latest")) == tmp_path / "step-000000004"


def _export(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["distrain", "export", *argv])
    try:
        cli.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_export_best_gathers_the_best_checkpoints_weights_from_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    job = compose_job("model.hidden_sizes=[16,8]")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(job), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"input_shape": [8, 8], "num_outputs": 10}))
    assert _export(monkeypatch, str(run_dir), "--best") == 2
    assert "has no best checkpoint" in capsys.readouterr().err

    store = CheckpointStore(run_dir / "checkpoints", keep=3)
    models = []
    for step in (1, 2):
        torch.manual_seed(step)
        models.append(instantiate(job["model"], input_shape=(8, 8), num_outputs=10))
        _save(store, step, models[-1].state_dict(), shards=3)
    store.mark_best(1)
    out = tmp_path / "best.safetensors"
    # No model.pt: a run stopped early still has its best checkpoint.
    assert _export(monkeypatch, str(run_dir), "--best", "--out", str(out)) == 0
    fresh = instantiate(json.loads(out.with_suffix(".json").read_text())["model"])
    fresh.load_state_dict(load_file(out))
    x = torch.randn(5, 8, 8)
    torch.testing.assert_close(fresh(x), models[0](x), rtol=0, atol=0)
    assert not torch.equal(fresh(x), models[1](x))  # the best, not the latest

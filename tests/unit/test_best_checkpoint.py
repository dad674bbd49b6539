"""The best checkpoint: kept through rotation while it is the best, and exported on its own.

Real files: checkpoints written by `CheckpointStore.save`, read back by `distrain export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from distrain import checkpoint
from distrain.checkpoint import CheckpointStore
from distrain.config import TrainerConfig
from distrain.saving import Checkpoints
from distrain.shards import chunk_rows
from tests.conftest import compose_job, distrain_cli


def _save(
    store: CheckpointStore, step: int, state: dict[str, torch.Tensor], shards: int = 2, **meta
):
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
    meta = {"step": step, "epoch": 0, "step_in_epoch": step, "tensors": index, **meta}
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


def test_export_best_gathers_the_best_checkpoints_weights_from_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    job = compose_job("model.hidden_sizes=[16,8]")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(job), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"input_shape": [8, 8], "num_outputs": 10}))
    assert distrain_cli(monkeypatch, "export", str(run_dir), "--best") == 2
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
    assert distrain_cli(monkeypatch, "export", str(run_dir), "--best", "--out", str(out)) == 0
    fresh = instantiate(json.loads(out.with_suffix(".json").read_text())["model"])
    fresh.load_state_dict(load_file(out))
    x = torch.randn(5, 8, 8)
    torch.testing.assert_close(fresh(x), models[0](x), rtol=0, atol=0)
    assert not torch.equal(fresh(x), models[1](x))  # the best, not the latest
    # Without --out, the final model and the best one go to files of their own.
    torch.save(models[1].state_dict(), run_dir / "model.pt")
    assert distrain_cli(monkeypatch, "export", str(run_dir), "--best") == 0
    assert distrain_cli(monkeypatch, "export", str(run_dir)) == 0
    for name, model in (("model-best", models[0]), ("model", models[1])):
        exported = load_file(run_dir / f"{name}.safetensors")
        assert (run_dir / f"{name}.json").exists(), name
        for key, value in model.state_dict().items():
            assert torch.equal(exported[key], value), (name, key)


def test_a_resumed_run_keeps_the_best_checkpoint_it_had_at_the_resumed_step(
    tmp_path: Path,
) -> None:
    """`resume=RUN` writes into the same directory: the best before the resume stays the best
    (not replaced by the first checkpoint evaluated after it), and a best pointer left at a
    later step by an abandoned continuation goes back to the best one on disk up to the resume."""
    store, state = CheckpointStore(tmp_path, keep=2), {"w": torch.zeros(4)}
    val_losses = [[10, 1.0], [20, 0.5], [30, 0.8], [40, 0.6]]
    for step in (10, 20):
        _save(store, step, state)
    store.mark_best(20)
    for step in (30, 40):
        _save(store, step, state, val_losses=[pair for pair in val_losses if pair[0] <= step])
    assert [path.name[-2:] for path in store.all()] == ["20", "30", "40"]

    def resumed_at_40() -> Checkpoints:
        checkpoints = Checkpoints(tmp_path, TrainerConfig(keep_checkpoints=2), {}, print)
        checkpoints.resumed_from(checkpoint.load(tmp_path / "step-000000040"))
        return checkpoints

    checkpoints = resumed_at_40()
    best = {"step": 20, "val_loss": 0.5, "path": str(tmp_path / "step-000000020")}
    assert checkpoints.stats()["best"] == best and store.best().name.endswith("20")
    assert checkpoints.val_losses == {10: 1.0, 20: 0.5, 30: 0.8, 40: 0.6}  # early stopping's

    _save(store, 50, state)
    store.mark_best(50)  # a continuation after step 40, abandoned: the run resumes from 40
    assert [path.name[-2:] for path in store.all()] == ["40", "50"]  # 20 went, as rotated
    checkpoints = resumed_at_40()
    best = {"step": 40, "val_loss": 0.6, "path": str(tmp_path / "step-000000040")}
    assert checkpoints.stats()["best"] == best and store.best().name.endswith("40")

"""Sharded checkpoints without Ray: what ranks write, and reading it back on another count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain import shards
from distrain.checkpoint_writer import CheckpointWriter
from distrain.records import CheckpointRecord


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def _write(model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int) -> tuple:
    """What `world_size` DDP ranks (identical replicas) would send, assembled as the driver
    assembles it: the index, and each rank's tensors."""
    records, tensors = [], []
    for rank in range(world_size):
        share, settings, values = shards.capture(
            model, optimizer, rank=rank, world_size=world_size, identical_replicas=True
        )
        header = {
            "position": {
                "step": 2,
                "epoch": 0,
                "step_in_epoch": 2,
                "epoch_loss_sum": 0.0,
                "epoch_batches": 2,
                "skipped_steps": 0,
            },
            "index": share.index,
            "optimizer_values": values,
            "lead": {"optimizer": settings, "scheduler": None, "scaler": None},
        }
        records.append(
            CheckpointRecord(step=2, epoch_end=False, header=header, share=[None], rank=rank)
        )
        tensors.append(share.tensors)
    writer = CheckpointWriter(store=None, job={}, fetch_timeout_s=1.0)  # type: ignore[arg-type]
    pending = None
    for record in records:
        pending = writer.add(record, world_size)
    assert pending is not None
    return pending.meta, tensors


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_each_rank_writes_its_rows_and_any_count_reads_the_whole(world_size: int) -> None:
    model, optimizer = _trained()
    meta, tensors = _write(model, optimizer, world_size)
    weight = meta["tensors"]["model/0.weight"]  # 7 rows
    assert [p["rows"] for p in weight["pieces"]] == [
        list(shards.chunk_rows(7, r, world_size))
        for r in range(world_size)
        if shards.chunk_rows(7, r, world_size)[0] < 7
    ]
    # Every element written once: the shares add up to the state, whatever the count.
    state_elements = sum(t.numel() for t in model.state_dict().values() if t.dim() > 0)
    state_elements += sum(
        t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0
    )
    written = sum(t.numel() for share in tensors for k, t in share.items() if t.dim() > 0)
    assert written == state_elements

    fresh, fresh_optimizer = _trained(seed=1)
    reader = shards.ShardReader(meta["tensors"], lambda i: tensors[i])
    model_state, optimizer_state = shards.restore_state(
        reader, fresh, fresh_optimizer, meta["optimizer"]
    )
    fresh.load_state_dict(model_state)
    fresh_optimizer.load_state_dict(optimizer_state)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_optimizer.param_groups[0]["betas"] == [0.8, 0.9]  # JSON: lists, same values


def test_rows_spanning_pieces_are_joined() -> None:
    index = {
        "w": {
            "shape": [5, 2],
            "dtype": "float32",
            "pieces": [{"shard": 0, "rows": [0, 3]}, {"shard": 1, "rows": [3, 5]}],
        }
    }
    full = torch.arange(10.0).reshape(5, 2)
    reader = shards.ShardReader(index, lambda i: {"w": full[:3] if i == 0 else full[3:]})
    assert torch.equal(reader.rows("w", 2, 4), full[2:4])
    assert reader.rows("w", 5, 5).shape == (0, 2)


def test_metadata_is_plain_data() -> None:
    assert shards.plain({"betas": (0.9, 0.99), "step": torch.tensor(3.0)}) == {
        "betas": [0.9, 0.99],
        "step": 3.0,
    }
    with pytest.raises(TypeError, match="plain values"):
        shards.plain({"lr": object()})

"""In-memory batches are gathered a chunk of steps at a time: the same samples in the same order
as the sampler's indices, whatever the chunk size, across chunk boundaries and resumes."""

import pytest
import torch
from torch.utils.data import TensorDataset

from distrain.data import batches as batches_module
from distrain.data.base import Splits
from distrain.data.batches import ShardBatches
from distrain.sharding import ShardSampler


@pytest.mark.parametrize("gather_bytes", [1, 200, 1 << 30])  # 1 step, 3 steps, the whole epoch
def test_chunked_batches_follow_the_sampler(monkeypatch, gather_bytes: int) -> None:
    monkeypatch.setattr(batches_module, "GATHER_BYTES", gather_bytes)
    x = torch.arange(70 * 3, dtype=torch.float32).reshape(70, 3)
    y = torch.arange(70) % 10
    splits = Splits(TensorDataset(x, y), TensorDataset(x[:8], y[:8]), (3,), 10)
    shard = ShardBatches(
        splits, global_batch=8, rank=1, world_size=2, seed=5, device=torch.device("cpu")
    )
    sampler = ShardSampler(70, 8, 1, 2, seed=5)
    for epoch, start in [(0, 0), (3, 2), (1, 7)]:
        got = list(shard.train_batches(epoch, start))
        expected = list(sampler.local_indices(epoch, start))
        assert len(got) == len(expected) == shard.steps_per_epoch - start
        for (xb, yb), indices in zip(got, expected):
            assert torch.equal(xb, x[indices]) and torch.equal(yb, y[indices])
            assert xb.is_contiguous() and xb.shape == (4, 3)

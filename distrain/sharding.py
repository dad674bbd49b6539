"""Which samples each worker sees: one permutation per (seed, epoch), split by rank.

Global batch k of an epoch is `perm[k*B:(k+1)*B]` and rank r takes the r-th contiguous slice of
it, B/world_size samples. The global batch therefore holds the same samples whatever the number of
workers, and averaging the workers' gradients gives exactly the gradient of the global batch:
`trainer.workers` does not change the mathematics. The tail of the permutation that does not fill
a global batch is left out of that epoch (the next epoch's permutation covers it), so every step
has a full batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every worker, every node and every resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class ShardSampler:
    """Per-step local sample indices of one rank."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int):
        # The batch splits over the ranks and fits the data: checked once, in distrain/plan.py.
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def local_indices(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Indices of this rank's part of each global batch, from `start_step` of the epoch."""
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        for step in range(start_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * self.local_batch
            yield perm[begin : begin + self.local_batch]


def eval_shard(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous evaluation shard; sizes differ by at most one, every sample exactly once."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))

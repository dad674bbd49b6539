"""Batches of one worker's shard, on its device.

In-memory data (TensorDatasets) is moved to the device once and batched by indexing with the
shard's indices: no per-sample `__getitem__`, no collate, no host-to-device copy per step.
Anything else goes through a DataLoader whose batch sampler yields the same indices, so both paths
see exactly the same samples in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from distrain.data.base import Splits
from distrain.sharding import ShardSampler, eval_shard

Batch = tuple[torch.Tensor, torch.Tensor]


class ShardBatches:
    """Training and evaluation batches of rank `rank` out of `world_size`."""

    def __init__(
        self,
        splits: Splits,
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        loader: str = "auto",
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        self.in_memory = splits.in_memory if loader == "auto" else loader == "memory"
        if self.in_memory and not splits.in_memory:
            raise ValueError("data.loader=memory needs a dataset built from in-memory tensors")
        self.sampler = ShardSampler(len(splits.train), global_batch, rank, world_size, seed)
        self.device = device
        self.val_transform = splits.val_transform
        self.num_workers = num_workers
        self.transform = splits.train_transform
        # Language models pass their micro-batch: (B, T, V) logits of 256 windows can be gigabytes.
        self.eval_batch = eval_batch_size or max(self.sampler.local_batch, 256)
        self.val_indices = eval_shard(len(splits.val), rank, world_size)
        if self.in_memory:
            self.train_tensors = _to_device(splits.train, device)
            self.val_tensors = _to_device(splits.val, device)
        else:
            self.train_set, self.val_set = splits.train, splits.val

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def local_batch(self) -> int:
        return self.sampler.local_batch

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        indices = self.sampler.local_indices(epoch, start_step)
        if self.in_memory:
            x_all, y_all = self.train_tensors
            batches = ((x_all[i.to(x_all.device)], y_all[i.to(y_all.device)]) for i in indices)
        elif hasattr(self.train_set, "get_batch"):  # e.g. token windows: one gather per batch
            batches = (self._to_device(self.train_set.get_batch(i)) for i in indices)
        else:
            batches = self._loader(self.train_set, [i.tolist() for i in indices])
        for x, y in batches:
            yield (self.transform(x) if self.transform else x), y

    def val_batches(self) -> Iterator[Batch]:
        for x, y in self._shard_val_batches():
            yield (self.val_transform(x) if self.val_transform else x), y

    def _shard_val_batches(self) -> Iterator[Batch]:
        start, stop = self.val_indices.start, self.val_indices.stop
        if self.in_memory:
            x_all, y_all = self.val_tensors
            for begin in range(start, stop, self.eval_batch):
                end = min(begin + self.eval_batch, stop)
                yield x_all[begin:end], y_all[begin:end]
        elif hasattr(self.val_set, "get_batch"):
            for begin in range(start, stop, self.eval_batch):
                end = min(begin + self.eval_batch, stop)
                yield self._to_device(self.val_set.get_batch(torch.arange(begin, end)))
        else:
            chunks = [
                list(range(b, min(b + self.eval_batch, stop)))
                for b in range(start, stop, self.eval_batch)
            ]
            yield from self._loader(self.val_set, chunks)

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _loader(self, dataset: Dataset, batches: list[list[int]]) -> Iterator[Batch]:
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _to_device(dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2
    x, y = dataset.tensors
    return x.to(device), y.to(device)

"""Batches of one worker's shard, on its device.

In-memory data (TensorDatasets) is moved to the device once and batched by indexing with the
shard's indices: no per-sample `__getitem__`, no collate, no host-to-device copy per step. The
epoch's indices go to the device once per epoch as one (steps, local batch) tensor, and a step
takes a row of it: a view, so the step loop never waits for the GPU to queue its next batch.
Anything else goes through a DataLoader whose batch sampler yields the same indices, so both paths
see exactly the same samples in the same order. That loader is built once (its worker processes
persist across epochs: forking them from a process holding a CUDA context each epoch is slow and
fragile); the sampler is told which (epoch, start step) to serve before each epoch.

A batch transform (augmentation, in memory) is drawn share by share: each configured rank's
share of the step from its own stream (distrain/streams.py), whichever worker holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from distrain import streams
from distrain.config import Loader
from distrain.data.base import Splits
from distrain.device import CUDA, pinned
from distrain.sharding import ShardSampler, eval_shard

Batch = tuple[torch.Tensor, torch.Tensor]
# In-memory batches are gathered this many bytes of steps at a time (at least one step).
GATHER_BYTES = 16 * 2**20


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
        loader: Loader = Loader.auto,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        shares: range | None = None,
    ) -> None:
        """`shares`: the configured ranks whose parts of each global batch this rank's local
        batch holds, in order (`StepPlan.shares`; None: `rank` alone)."""
        self.in_memory = splits.in_memory if loader == Loader.auto else loader == Loader.memory
        if self.in_memory and not splits.in_memory:
            raise ValueError("data.loader=memory needs a dataset built from in-memory tensors")
        self.sampler = ShardSampler(len(splits.train), global_batch, rank, world_size, seed)
        self.device, self.seed = device, seed
        self.shares = shares if shares is not None else range(rank, rank + 1)
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
            self.epoch_sampler = EpochBatchSampler(self.sampler)
            self.train_loader = self._make_loader(splits.train, self.epoch_sampler)
            start, stop = self.val_indices.start, self.val_indices.stop
            chunks = [
                list(range(b, min(b + self.eval_batch, stop)))
                for b in range(start, stop, self.eval_batch)
            ]
            self.val_loader = self._make_loader(splits.val, chunks)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def local_batch(self) -> int:
        return self.sampler.local_batch

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.in_memory:
            batches = self._memory_batches(epoch, start_step)
        elif hasattr(self.train_set, "get_batch"):  # e.g. token windows: one gather per batch
            indices = self.sampler.local_indices(epoch, start_step)
            batches = (self._to_device(self.train_set.get_batch(i)) for i in indices)
        else:
            self.epoch_sampler.set_epoch(epoch, start_step)
            batches = self._train_loader_batches(epoch, start_step)
        if not self.transform:
            yield from batches
        else:
            for step_in_epoch, (x, y) in enumerate(batches, start_step):
                yield self._augmented(x, epoch * self.steps_per_epoch + step_in_epoch), y

    def _augmented(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The transform applied to each configured rank's share of `x` (the batch after `step`
        optimizer steps), drawing from that rank's stream."""
        assert self.transform is not None
        out = []
        for share, x_share in zip(self.shares, x.chunk(len(self.shares)), strict=True):
            streams.reseed(self.device, streams.share_seed(self.seed, share, step, streams.AUGMENT))
            out.append(self.transform(x_share))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _memory_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """Steps gathered `GATHER_BYTES` at a time: one index_select per chunk, not two per step
        (on a ~1 ms step, per-step gathers and generator hops cost several percent)."""
        table = self._epoch_table(epoch, start_step)
        if table is None:
            return
        x_all, y_all = self.train_tensors
        step_bytes = table.shape[1] * (x_all[:1].nbytes + y_all[:1].nbytes)
        for rows in table.split(max(1, GATHER_BYTES // max(step_bytes, 1))):
            flat = rows.flatten()
            xs = x_all.index_select(0, flat).unflatten(0, rows.shape)
            ys = y_all.index_select(0, flat).unflatten(0, rows.shape)
            yield from zip(xs, ys)  # (local batch, ...) views of the chunk

    def epoch_indices(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """This rank's indices per step, as rows of one tensor moved to the device once."""
        table = self._epoch_table(epoch, start_step)
        if table is not None:
            yield from table  # rows of `table`: views, no copy

    def _epoch_table(self, epoch: int, start_step: int) -> torch.Tensor | None:
        rows = list(self.sampler.local_indices(epoch, start_step))
        if not rows:
            return None
        # Pinned + non_blocking on a GPU: not even the epoch's one copy makes the host wait.
        return pinned(torch.stack(rows), self.device).to(self.device, non_blocking=True)

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
            yield from self._loader_batches(self.val_loader)

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _make_loader(self, dataset: Dataset, batch_sampler: Iterable[list[int]]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == CUDA,
            persistent_workers=self.num_workers > 0,
        )

    def _train_loader_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """The training loader's batches. Without loader processes, per-sample transforms draw
        in this process as a batch is fetched: from the augmentation stream of this rank's (first)
        share at that step, so a replacement fetches what the rank it replaces would have. (In
        loader processes they draw from the loader's own per-process seeds.)"""
        batches = iter(self.train_loader)
        for step_in_epoch in range(start_step, self.steps_per_epoch):
            if self.num_workers == 0:
                step = epoch * self.steps_per_epoch + step_in_epoch
                share = self.shares[0]
                streams.reseed(
                    self.device, streams.share_seed(self.seed, share, step, streams.AUGMENT)
                )
            batch = next(batches, None)
            if batch is None:
                return
            yield self._to_device(batch)

    def _loader_batches(self, loader: DataLoader) -> Iterator[Batch]:
        for batch in loader:
            yield self._to_device(batch)


class EpochBatchSampler(Sampler[list[int]]):
    """The batch sampler of the persistent training DataLoader: one rank's batches of one epoch,
    from a start step (a resume), chosen by `set_epoch` before each epoch.

    It runs in the worker's main process (the loader's processes receive index lists), so setting
    the epoch here reaches persistent loader processes too.
    """

    def __init__(self, sampler: ShardSampler) -> None:
        self.sampler = sampler
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.sampler.local_indices(self.epoch, self.start_step):
            yield indices.tolist()

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.start_step


def _to_device(dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2
    x, y = dataset.tensors
    return x.to(device), y.to(device)

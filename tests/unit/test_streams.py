"""Random streams of configured ranks (distrain/streams.py): one worker that stands for two ranks
(a smaller group: elastic, or survivors training on during a heal) draws exactly what the two
would have, for the augmentation of its batch and for the forward pass (dropout)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from distrain import build
from distrain.config import DataConfig
from distrain.data.batches import ShardBatches
from distrain.step import Parts, train_step
from tests.conftest import compose_job
from tests.unit.test_step import one_worker_parts

CPU = torch.device("cpu")
SEED = 3


def _parts(model: nn.Module, shares: range) -> Parts:
    """One worker's parts (test_step's: SGD, MSE, micro-batches of 4), standing for `shares`."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return dataclasses.replace(one_worker_parts(model, scaler, None), shares=shares, seed=SEED)


def _gradients(model: nn.Module, shares: range, x: torch.Tensor, y: torch.Tensor) -> list:
    model = copy.deepcopy(model)
    train_step(_parts(model, shares), x, y, step=5)
    return [p.grad.clone() for p in model.parameters()]


def test_a_worker_for_two_ranks_draws_their_dropout_and_gets_their_averaged_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    # Two workers: each its half (rank r's share), then the average an all-reduce forms.
    halves = [
        _gradients(model, range(r, r + 1), x[4 * r : 4 * r + 4], y[4 * r : 4 * r + 4])
        for r in (0, 1)
    ]
    averaged = [g0 * 0.5 + g1 * 0.5 for g0, g1 in zip(*halves, strict=True)]
    # One worker standing for both: its two micro-batches draw from ranks 0 and 1's streams.
    alone = _gradients(model, range(0, 2), x, y)
    assert all(torch.equal(a, b) for a, b in zip(alone, averaged, strict=True))
    # Not by chance: without the reseeding, the second micro-batch's dropout differs.
    unseeded = _gradients(model, range(0), x, y)
    assert not all(torch.equal(a, b) for a, b in zip(unseeded, averaged, strict=True))


def test_a_worker_for_two_ranks_augments_each_share_as_its_rank_would() -> None:
    job = compose_job("data=digits")
    splits = build.build_splits(DataConfig.of(job["data"]))
    noisy = dataclasses.replace(splits, train_transform=lambda x: x + torch.randn_like(x))

    def batches(rank: int, world_size: int, shares: range | None = None) -> ShardBatches:
        return ShardBatches(
            noisy,
            global_batch=8,
            rank=rank,
            world_size=world_size,
            seed=SEED,
            device=CPU,
            shares=shares,
        )

    def step_batches(source: ShardBatches) -> list[torch.Tensor]:
        return [x for x, _ in list(source.train_batches(epoch=1, start_step=2))[:3]]

    pair = [step_batches(batches(rank, 2)) for rank in (0, 1)]
    alone = step_batches(batches(0, 1, shares=range(0, 2)))
    for step, x in enumerate(alone):
        assert torch.equal(x, torch.cat([pair[0][step], pair[1][step]]))
    # ... and each (rank, step) has its own noise: not one stream reused.
    plain = dataclasses.replace(splits, train_transform=None)
    raw = [
        step_batches(
            ShardBatches(plain, global_batch=8, rank=r, world_size=2, seed=SEED, device=CPU)
        )
        for r in (0, 1)
    ]
    noise = [[x - x_raw for x, x_raw in zip(pair[r], raw[r], strict=True)] for r in (0, 1)]
    assert not torch.equal(noise[0][0], noise[0][1]) and not torch.equal(noise[0][0], noise[1][0])


def test_per_sample_transforms_in_this_process_draw_from_the_rank_and_step() -> None:
    """data.loader=dataloader without loader processes: a per-sample random transform runs as
    the batch is fetched; what it draws is a function of (rank, step), not of what the process
    drew before (the step's dropout), so a replacement starting at a step fetches that step's
    batch as the rank did."""
    job = compose_job(
        "data=dataset",
        "data.train._target_=tests.userdata.Clusters",
        "+data.train.num_samples=64",
        "data.train_transforms=[{_target_:tests.userdata.GaussianNoise}]",
    )
    splits = build.build_splits(DataConfig.of(job["data"]))

    def fetched(start_step: int, drawn_between: int) -> list[torch.Tensor]:
        batches = ShardBatches(splits, global_batch=8, rank=1, world_size=2, seed=SEED, device=CPU)
        assert not batches.in_memory
        out = []
        for x, _ in batches.train_batches(epoch=1, start_step=start_step):
            out.append(x)
            torch.randn(drawn_between)  # the step's own draws
            if len(out) == 2:
                return out
        raise AssertionError("fewer than two steps")

    running, replacement = fetched(2, 7), fetched(3, 0)
    assert torch.equal(running[1], replacement[0])

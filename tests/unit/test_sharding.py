import pytest
import torch

from distrain.sharding import ShardSampler, epoch_permutation, eval_shard


def _epoch(num_samples: int, batch: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    samplers = [ShardSampler(num_samples, batch, r, world, seed) for r in range(world)]
    return [[i for idx in s.local_indices(epoch) for i in idx.tolist()] for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_every_full_batch(world: int) -> None:
    num_samples, batch = 1001, 12
    shards = _epoch(num_samples, batch, world, seed=7, epoch=3)
    flat = [i for shard in shards for i in shard]
    assert len(flat) == len(set(flat))  # disjoint
    steps = num_samples // batch
    perm = epoch_permutation(num_samples, 7, 3)
    assert sorted(flat) == sorted(perm[: steps * batch].tolist())  # complete, tail left over
    assert all(len(s) == steps * batch // world for s in shards)


def test_global_batch_is_the_same_whatever_the_worker_count() -> None:
    # The contract behind "trainer.workers does not change the mathematics".
    one = ShardSampler(500, 20, 0, 1, seed=1)
    four = [ShardSampler(500, 20, r, 4, seed=1) for r in range(4)]
    for whole, *parts in zip(one.local_indices(2), *(s.local_indices(2) for s in four)):
        assert torch.equal(whole, torch.cat(parts))


def test_permutation_is_deterministic_and_changes_per_epoch() -> None:
    assert torch.equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 0, 1))
    assert not torch.equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 0, 2))
    assert not torch.equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 1, 1))


def test_resume_inside_an_epoch_continues_the_same_order() -> None:
    sampler = ShardSampler(300, 10, 1, 2, seed=3)
    full = list(sampler.local_indices(0))
    assert all(torch.equal(a, b) for a, b in zip(full[7:], sampler.local_indices(0, start_step=7)))


@pytest.mark.parametrize(("num_samples", "world"), [(10, 3), (7, 4), (3, 4), (100, 1)])
def test_eval_shards_cover_every_sample_exactly_once(num_samples: int, world: int) -> None:
    shards = [eval_shard(num_samples, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(num_samples))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1

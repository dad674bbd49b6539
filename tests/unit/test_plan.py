"""The step plan: the batch and step arithmetic of a run, computed and checked in one place."""

from __future__ import annotations

import pytest

from distrain.errors import ConfigError
from distrain.plan import plan_steps


def _plan(train_samples: int = 1437, **settings: object):
    defaults = {
        "global_batch": 64,
        "micro_batch": None,
        "world_size": 2,
        "epochs": 3,
        "max_steps": None,
    }
    return plan_steps(train_samples, **{**defaults, **settings})


def test_the_numbers_of_a_run() -> None:
    plan = _plan()  # digits: 1,437 training samples, global batch 64 on 2 workers
    assert (plan.steps_per_epoch, plan.total_steps) == (22, 66)
    assert (plan.local_batch, plan.micro_batch, plan.accumulation_steps) == (32, 32, 1)
    assert _plan(max_steps=10).total_steps == 10
    assert _plan(max_steps=1000).total_steps == 66
    accumulating = _plan(micro_batch=8)
    assert (accumulating.micro_batch, accumulating.accumulation_steps) == (8, 4)


def test_fewer_workers_keep_the_global_batch_and_the_per_worker_micro_batch() -> None:
    plan = _plan(world_size=4)  # 16 samples per worker
    assert plan.on(4) == plan
    smaller = plan.on(2)
    assert (smaller.world_size, smaller.global_batch, smaller.local_batch) == (2, 64, 32)
    assert (smaller.micro_batch, smaller.accumulation_steps) == (16, 2)
    assert (smaller.steps_per_epoch, smaller.total_steps) == (plan.steps_per_epoch, 66)
    assert _plan(world_size=4, micro_batch=8).on(1).accumulation_steps == 8
    with pytest.raises(ConfigError, match="3 workers cannot keep the global batch 64"):
        plan.on(3)
    # Each worker of a smaller group stands for whole configured ranks, in order.
    assert [list(plan.shares(rank)) for rank in range(4)] == [[0], [1], [2], [3]]
    assert [list(smaller.shares(rank)) for rank in range(2)] == [[0, 1], [2, 3]]
    assert list(plan.on(1).shares(0)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"global_batch": 63}, r"data.batch_size=63 \(the global batch\) cannot be split evenly"),
        ({"global_batch": 64, "world_size": 3}, r"e\.g\. 63 or 66"),
        ({"micro_batch": 5}, r"data.micro_batch_size=5 must divide the per-worker batch 32"),
        ({"micro_batch": 64}, "data.micro_batch_size=64 must divide"),
        ({"global_batch": 2048}, r"data.batch_size=2048 is larger than the training set \(1437"),
    ],
)
def test_a_batch_that_does_not_fit_is_named(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(**settings)

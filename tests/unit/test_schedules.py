"""Learning-rate schedules, linear lr scaling and weight-decay groups: values per step,
resumption, bad values."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from distrain import build, schedules
from distrain.cli import CONF_DIR
from distrain.config import ConfigError
from distrain.validation import validate
from tests.conftest import compose_job

BASE_LR = 0.4


def _optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def _lrs(scheduler, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps trains with, stepping as the worker does."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def test_step_decays_once_per_block_of_epochs() -> None:
    lrs = _lrs(schedules.step(_optimizer(), steps_per_epoch=3, step_size_epochs=2, gamma=0.5), 13)
    assert lrs == pytest.approx([0.4] * 6 + [0.2] * 6 + [0.1])


def test_cosine_runs_from_lr_to_the_floor() -> None:
    total = 100
    lrs = _lrs(schedules.cosine(_optimizer(), total_steps=total, min_lr_ratio=0.1), total)
    assert lrs[0] == pytest.approx(BASE_LR)
    assert all(a > b for a, b in pairwise(lrs))
    assert lrs[50] == pytest.approx(BASE_LR * (0.1 + 0.9 * 0.5))  # half-way: the mean
    floor = BASE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lrs[-1] == pytest.approx(floor) and lrs[-1] > 0.1 * BASE_LR


def test_warmup_cosine_ramps_linearly_per_iteration_then_decays() -> None:
    # 2 epochs of 5 steps warm-up, 30 steps in all: Goyal et al.'s constant increment per step.
    scheduler = schedules.warmup_cosine(
        _optimizer(), steps_per_epoch=5, total_steps=30, warmup_epochs=2
    )
    lrs = _lrs(scheduler, 30)
    assert lrs[:10] == pytest.approx([BASE_LR * (k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(BASE_LR)  # the first decay step is still the peak
    assert all(a > b for a, b in pairwise(lrs[10:]))
    assert lrs[20] == pytest.approx(BASE_LR / 2)  # half-way through the 20 cosine steps

    started = schedules.warmup_cosine(
        _optimizer(), steps_per_epoch=10, total_steps=40, warmup_epochs=0.5, warmup_start_ratio=0.5
    )
    assert _lrs(started, 5) == pytest.approx(
        [BASE_LR * (0.5 + 0.5 * k / 5) for k in (1, 2, 3, 4, 5)]
    )


def test_onecycle_peaks_at_pct_start_and_survives_the_workers_step_count() -> None:
    total = 40
    scheduler = schedules.onecycle(_optimizer(), total_steps=total, pct_start=0.25)
    lrs = _lrs(scheduler, total)  # the worker steps the scheduler after every step, the last too
    assert lrs[0] == pytest.approx(BASE_LR / 25)  # max_lr null: the optimizer's lr is the peak
    assert max(lrs) == pytest.approx(BASE_LR) and lrs.index(max(lrs)) == round(0.25 * total) - 1
    assert lrs[-1] < BASE_LR / 25 / 100


# Every conf/scheduler/*.yaml but the constant one, so a new schedule config is tested too.
SCHEDULES = sorted(
    path.stem for path in (CONF_DIR / "scheduler").glob("*.yaml") if path.stem != "none"
)


def test_the_schedules_are_listed() -> None:
    assert {"cosine", "onecycle", "step", "warmup_cosine"} <= set(SCHEDULES)  # the glob works
    assert (
        build.build_scheduler(
            compose_job()["scheduler"], _optimizer(), steps_per_epoch=3, total_steps=9
        )
        is None
    )


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_resumed_schedule_continues_exactly(name: str) -> None:
    """The lr is a function of the step count: a scheduler restored from its state_dict after k
    steps gives the same remaining lrs as one that never stopped."""
    counts = {"steps_per_epoch": 4, "total_steps": 24}
    extra = ["scheduler.warmup_epochs=1"] if name == "warmup_cosine" else []
    scheduler_cfg = compose_job(f"scheduler={name}", *extra)["scheduler"]
    reference = _lrs(build.build_scheduler(scheduler_cfg, _optimizer(), **counts), 24)

    first = build.build_scheduler(scheduler_cfg, _optimizer(), **counts)
    head = _lrs(first, 10)
    # Torch's resume order: build both from the config, then load both states.
    resumed_optimizer = _optimizer()
    resumed = build.build_scheduler(scheduler_cfg, resumed_optimizer, **counts)
    resumed_optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert head + _lrs(resumed, 14) == pytest.approx(reference)
    assert len(set(reference)) > 1  # the schedule does change the lr


def test_a_torch_scheduler_class_can_be_named_directly() -> None:
    config = {"_target_": "torch.optim.lr_scheduler.ExponentialLR", "_partial_": True, "gamma": 0.5}
    scheduler = build.build_scheduler(config, _optimizer(), steps_per_epoch=3, total_steps=9)
    assert _lrs(scheduler, 3) == pytest.approx([0.4, 0.2, 0.1])
    assert build.build_scheduler({}, _optimizer(), steps_per_epoch=3, total_steps=9) is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda o: schedules.step(o, steps_per_epoch=3, step_size_epochs=0), "step_size_epochs=0"),
        (lambda o: schedules.step(o, steps_per_epoch=3, gamma=1.5), "gamma=1.5"),
        (lambda o: schedules.cosine(o, total_steps=9, min_lr_ratio=2), "min_lr_ratio=2"),
        (
            lambda o: schedules.warmup_cosine(
                o, steps_per_epoch=5, total_steps=20, warmup_epochs=4
            ),
            r"warmup_epochs=4 \(20 steps\) is not shorter than the whole run \(20 steps\)",
        ),
        (lambda o: schedules.onecycle(o, total_steps=9, pct_start=1.0), "pct_start=1.0"),
    ],
)
def test_bad_schedule_values_are_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(_optimizer())


# ---------------------------------------------------------------- optimizer.lr_scaling


def test_linear_lr_scaling_multiplies_by_global_over_reference_batch() -> None:
    model = torch.nn.Linear(2, 2)
    job = compose_job("optimizer.lr=0.1", "optimizer.lr_scaling=linear", "data.batch_size=1024")
    optimizer = build.build_optimizer(job["optimizer"], model, global_batch=1024)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 1024 / 256)
    assert "lr_scaling" not in optimizer.defaults  # distrain's keys never reach torch

    job = compose_job(
        "optimizer=adamw", "optimizer.lr_scaling=linear", "optimizer.reference_batch=32"
    )
    optimizer = build.build_optimizer(job["optimizer"], model, global_batch=64)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 2)

    unscaled = build.build_optimizer(compose_job()["optimizer"], model, global_batch=1024)
    assert unscaled.param_groups[0]["lr"] == pytest.approx(0.1)


def test_warmup_reaches_the_scaled_lr() -> None:
    """Goyal et al.: warm-up ramps to base lr x global batch / 256, then decays."""
    job = compose_job(
        "optimizer.lr_scaling=linear", "scheduler=warmup_cosine", "scheduler.warmup_epochs=1"
    )
    optimizer = build.build_optimizer(job["optimizer"], torch.nn.Linear(2, 2), global_batch=512)
    scheduler = build.build_scheduler(
        job["scheduler"], optimizer, steps_per_epoch=4, total_steps=20
    )
    assert _lrs(scheduler, 5) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])


# ---------------------------------------------------------------- optimizer.decay_norms_and_biases


def _embedding_norm_linear() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    )


def test_decay_norms_and_biases_false_decays_only_tensors_of_2_or_more_dims() -> None:
    """nanoGPT's groups: embeddings and linear weights decay; norm gains and biases do not."""
    model = _embedding_norm_linear()
    adamw = ["optimizer=adamw", "optimizer.weight_decay=0.5"]
    every = build.build_optimizer(compose_job(*adamw)["optimizer"], model, global_batch=8)
    assert len(every.param_groups) == 1  # the default: torch's, everything decays

    grouped = compose_job(*adamw, "optimizer.decay_norms_and_biases=false")["optimizer"]
    optimizer = build.build_optimizer(grouped, model, global_batch=8)
    decayed, exempt = optimizer.param_groups
    assert "decay_norms_and_biases" not in optimizer.defaults  # distrain's key never reaches torch
    assert [p.ndim for p in decayed["params"]] == [2, 2]  # embedding, linear weight
    assert [p.ndim for p in exempt["params"]] == [1, 1, 1]  # norm weight and bias, linear bias
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.5, 0.0)
    # With zero gradients an AdamW step is the decay alone: it shrinks only the 2-D tensors.
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for (name, param), old in zip(model.named_parameters(), before, strict=True):
        factor = 1 - 0.001 * 0.5 if param.ndim >= 2 else 1.0
        torch.testing.assert_close(param.detach(), old * factor, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.decay_norms_and_biases=maybe"], "optimizer.decay_norms_and_biases='maybe'"),
        (["optimizer.lr_scaling=quadratic"], "optimizer.lr_scaling='quadratic' is not one of"),
        (["optimizer.reference_batch=0"], "optimizer.reference_batch=0"),
        (["data.num_workers=-1"], "data.num_workers=-1"),
    ],
)
def test_bad_scaling_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_job(*overrides))

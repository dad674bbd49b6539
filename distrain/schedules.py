"""Learning-rate schedules, all stepped once per optimizer step (the worker's `scheduler.step()`).

Each builder is named by `_target_` in `conf/scheduler/*.yaml` with `_partial_: true`;
`build.build_scheduler` passes the optimizer and, to builders that take them, `steps_per_epoch`
and `total_steps` (the run's optimizer steps, `trainer.max_steps` included). Schedules counted in
epochs are written per iteration, `epoch = step // steps_per_epoch`, so the learning rate is a
pure function of the step count: the same on every worker, for any `trainer.workers`, and after a
resume from a step count (the scheduler's `state_dict` is just `last_epoch` = steps taken).

`torch.optim.lr_scheduler.LambdaLR` multiplies each parameter group's initial lr by the factor,
so the factor functions below are plain picklable callables (classes, not lambdas) of the step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class StepFactor:
    """`gamma ** (epoch // step_size_epochs)`: torch's StepLR counted in epochs."""

    def __init__(self, steps_per_epoch: int, step_size_epochs: int, gamma: float) -> None:
        self.steps_per_epoch, self.step_size_epochs, self.gamma = (
            steps_per_epoch,
            step_size_epochs,
            gamma,
        )

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return self.gamma ** (epoch // self.step_size_epochs)


class WarmupCosineFactor:
    """Linear warm-up over `warmup_steps`, then a half cosine down to `min_lr_ratio` at the end."""

    def __init__(
        self, warmup_steps: int, total_steps: int, min_lr_ratio: float, warmup_start_ratio: float
    ) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio, self.warmup_start_ratio = min_lr_ratio, warmup_start_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # Step 0 already trains at start + 1/warmup of the way up (Goyal et al. raise the lr
            # by a constant amount every iteration); the last warm-up step reaches the peak.
            done = (step + 1) / self.warmup_steps
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * done
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def step(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    step_size_epochs: int = 1,
    gamma: float = 0.1,
) -> LambdaLR:
    """Multiply the lr by `gamma` every `step_size_epochs` epochs."""
    _check(
        isinstance(step_size_epochs, int) and step_size_epochs >= 1,
        f"scheduler.step_size_epochs={step_size_epochs} must be a whole number of epochs >= 1.",
    )
    _check(0.0 < gamma <= 1.0, f"scheduler.gamma={gamma} must be in (0, 1].")
    return LambdaLR(optimizer, StepFactor(steps_per_epoch, step_size_epochs, gamma))


def cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Half a cosine, per iteration, from the optimizer's lr down to `min_lr_ratio` x lr."""
    return warmup_cosine(
        optimizer,
        steps_per_epoch=1,
        total_steps=total_steps,
        warmup_epochs=0,
        min_lr_ratio=min_lr_ratio,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    total_steps: int,
    warmup_epochs: float = 5.0,
    min_lr_ratio: float = 0.0,
    warmup_start_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from `warmup_start_ratio` x lr over `warmup_epochs`, then cosine decay.

    The large-batch recipe of Goyal et al. (2017) with `optimizer.lr_scaling=linear`: the
    optimizer's lr is already scaled by global batch / reference batch, and the warm-up ramps up
    to it per iteration. Fractional `warmup_epochs` are allowed (rounded to whole steps).
    """
    _check(warmup_epochs >= 0, f"scheduler.warmup_epochs={warmup_epochs} must be >= 0.")
    _check(0.0 <= min_lr_ratio <= 1.0, f"scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1].")
    _check(
        0.0 <= warmup_start_ratio <= 1.0,
        f"scheduler.warmup_start_ratio={warmup_start_ratio} must be in [0, 1].",
    )
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    _check(
        warmup_steps < total_steps or warmup_steps == 0,
        f"scheduler.warmup_epochs={warmup_epochs} ({warmup_steps} steps) is not shorter than the "
        f"whole run ({total_steps} steps): lower it or train longer.",
    )
    factor = WarmupCosineFactor(warmup_steps, total_steps, min_lr_ratio, warmup_start_ratio)
    return LambdaLR(optimizer, factor)


def onecycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    max_lr: float | None = None,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """torch's OneCycleLR over the whole run; `max_lr` null: the optimizer's (scaled) lr.

    The lr rises from max_lr / div_factor to max_lr over `pct_start` of the steps, then anneals
    to max_lr / (div_factor x final_div_factor); momentum (SGD) or beta1 (Adam) cycles inversely.
    """
    _check(0.0 < pct_start < 1.0, f"scheduler.pct_start={pct_start} must be in (0, 1).")
    if max_lr is None:
        max_lr = optimizer.param_groups[0]["lr"]
    _check(max_lr > 0, f"scheduler.max_lr={max_lr} must be > 0.")
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )

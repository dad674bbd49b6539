"""`train_step` against the textbook step on one worker: gradient clipping (`trainer.max_grad_norm`)
in PyTorch's AMP order (unscale, clip, step), with accumulated micro-batches.

Workers that average first are checked end to end in tests/test_aggregators.py."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from distrain.aggregators.allreduce import AllReduce
from distrain.step import Parts, train_step

LR, MAX_NORM = 0.1, 0.5


def one_worker_parts(
    model: nn.Module, scaler: torch.amp.GradScaler, max_grad_norm: float | None
) -> Parts:
    aggregator = AllReduce()
    aggregator.connect(
        rank=0, world_size=1, device=torch.device("cpu"), rendezvous={}, timeout_s=10.0
    )
    optimizer = aggregator.build_optimizer(
        lambda params: torch.optim.SGD(params, lr=LR), model.parameters(), shard=False
    )
    return Parts(
        model=model,
        train_model=aggregator.wrap(model),
        loss_fn=nn.MSELoss(),
        optimizer=optimizer,
        scheduler=None,
        aggregator=aggregator,
        batches=None,  # type: ignore[arg-type]  (train_step is handed its batch)
        autocast=contextlib.nullcontext,
        scaler=scaler,
        micro_batch_size=4,  # 2 accumulated micro-batches of the batch of 8
        max_grad_norm=max_grad_norm,
        task="regression",
    )


@pytest.mark.parametrize("loss_scaling", [False, True], ids=["fp32", "fp16-scaler"])
def test_a_step_clips_the_averaged_gradient_to_max_grad_norm(loss_scaling: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 4), 10 * torch.randn(8, 3)  # far targets: a gradient norm well above 0.5
    # A loss scale of 1024: clipping before unscaling would clip a norm 1024 times too large.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=loss_scaling)

    loss, finite = train_step(one_worker_parts(model, scaler, MAX_NORM), x, y)

    reference_loss = nn.functional.mse_loss(reference(x), y)
    reference_loss.backward()
    norm_before = nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    assert norm_before > 10 * MAX_NORM  # clipping really acts in this step
    with torch.no_grad():
        for p in reference.parameters():
            p -= LR * p.grad
    assert finite
    # The loss of the batch, as the mean of its two micro-batches' losses.
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    # The gradient left in .grad is the clipped one.
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert clipped == pytest.approx(MAX_NORM, rel=1e-4)


def test_without_max_grad_norm_the_step_is_unclipped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), 10 * torch.randn(8, 3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(one_worker_parts(model, scaler, None), x, y)
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm > 10 * MAX_NORM

"""The textbook step, on one worker's local batch: zero_grad, forward, loss, backward,
aggregate, optimizer step; and `Parts`, what a worker built from the config to take it.

`train_step` reads as the loop in pytorch/examples does; what is distributed about it sits behind
`parts.aggregator` (gradients averaged across workers) and `parts.train_model` (the model as the
aggregator wrapped it: DDP, FSDP2). `distrain/loop.py` calls it step after step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distrain import streams
from distrain.aggregators.base import GradientAggregator
from distrain.data.batches import ShardBatches
from distrain.timing import StepClock


@dataclass
class Parts:
    """Everything a worker built from the config, passed down as objects."""

    model: nn.Module  # the bare model (evaluation, checkpoints)
    train_model: nn.Module  # the model as wrapped by the aggregator (training)
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler stepped once per optimizer step, or None
    aggregator: GradientAggregator
    batches: ShardBatches
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler
    micro_batch_size: int
    max_grad_norm: float | None  # trainer.max_grad_norm: clip the averaged gradient (None: no)
    task: str  # classification | regression | language_model
    num_outputs: int = 0  # classes of a classification task (top-5 accuracy when > 5)
    # Language models: tokens per sample (the window), FLOPs per token and this worker's peak
    # FLOP/s (tokens/s and MFU; distrain/mfu.py), bytes per token (bits per byte when known),
    # and on rank 0 a sampler that continues a fixed prompt (text for TensorBoard).
    tokens_per_sample: int = 0
    flops_per_token: float = 0.0
    peak_flops_per_s: float = 0.0
    bytes_per_token: float | None = None
    sample: Callable[[], list[str]] | None = None
    # The configured ranks whose shares of the batch this worker takes (`StepPlan.shares`)
    # and trainer.seed: each share's forward pass draws (dropout) from that rank's stream
    # (distrain/streams.py). An empty range: no reseeding.
    shares: range = range(0)
    seed: int = 0


def train_step(
    parts: Parts,
    x: torch.Tensor,
    y: torch.Tensor,
    clock: StepClock | None = None,
    inspect: Callable[[], None] | None = None,
    *,
    skip_non_finite: bool = False,
    step: int = 0,
) -> tuple[torch.Tensor, bool]:
    """One optimizer step on the local batch, after `step` optimizer steps.

    Returns the local mean loss (detached) and whether the step's averaged gradient was finite.
    `clock` splits the step's time into phases; `inspect` runs between aggregation and the
    optimizer step, when `.grad` holds the averaged gradients (gradient norm, histograms).
    """
    clock = clock or StepClock()
    model, optimizer, aggregator, scaler = (
        parts.train_model,
        parts.optimizer,
        parts.aggregator,
        parts.scaler,
    )
    size = parts.micro_batch_size
    micro_batches = [(x, y)] if len(x) <= size else list(zip(x.split(size), y.split(size)))
    count = len(micro_batches)
    # Each share is a whole number of micro-batches (the configured per-worker batch is).
    per_share = count // max(len(parts.shares), 1)
    optimizer.zero_grad(set_to_none=True)
    total_loss: torch.Tensor | None = None
    for i, (x_micro, y_micro) in enumerate(micro_batches):
        if parts.shares and i % per_share == 0:
            share = parts.shares[i // per_share]
            streams.reseed(x.device, streams.share_seed(parts.seed, share, step, streams.FORWARD))
        # Gradients are only communicated on the last micro-batch (accumulation without traffic).
        with aggregator.sync_if(i == count - 1), parts.autocast():
            loss = parts.loss_fn(model(x_micro), y_micro)
            if count > 1:  # the mean over micro-batches (`/ 1` would add a node to backward)
                loss = loss / count
        scaler.scale(loss).backward()
        loss = loss.detach().float()
        total_loss = loss if total_loss is None else total_loss + loss
    clock.lap("forward_backward_s")
    aggregator.synchronize()
    clock.lap("aggregation_wait_s")
    # DDP all-reduces inside backward: the time backward sat waiting for it is waiting too.
    clock.shift(
        "forward_backward_s",
        "aggregation_wait_s",
        aggregator.backward_wait_s(),
        cpu_wait_s=aggregator.backward_cpu_wait_s(),
    )
    if inspect is not None:
        inspect()
        clock.restart()  # logging work is nobody's step time
    # fp16's scaler skips non-finite steps by itself (that is its job). Otherwise the averaged
    # gradient is checked here only when a bad step is to be skipped: the check costs a sync per
    # step on a GPU and ~20 % of a small CPU step. Under nan_policy=stop `fit` checks the loss
    # and the parameters at log steps and boundaries instead.
    finite = not skip_non_finite or scaler.is_enabled() or grads_are_finite(parts.model)
    if finite and parts.max_grad_norm is not None:
        clip_gradients(parts.model, parts.max_grad_norm, scaler, optimizer)
    if finite and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif finite:  # a disabled scaler's step is optimizer.step() behind two calls
        optimizer.step()
    # A skipped step still advances the schedule, which stays a function of the step count.
    if parts.scheduler is not None:
        parts.scheduler.step()
    clock.lap("optimizer_s")
    assert total_loss is not None  # a batch has at least one micro-batch
    return total_loss, finite


def clip_gradients(
    model: nn.Module,
    max_norm: float,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Scale the averaged gradients down so their global L2 norm is at most `max_norm`.

    After aggregation every rank holds the same averaged gradient, so every rank clips by the same
    factor and the replicas stay equal. FSDP2's gradients are DTensor shards: torch's
    `clip_grad_norm_` reduces their norm across the ranks itself. No host sync: the factor stays
    a tensor on the device. Under fp16 the scaler unscales first (PyTorch's AMP recipe), and its
    `step` then knows not to unscale again.
    """
    scaler.unscale_(optimizer)  # a no-op for a disabled scaler (fp32, bf16)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def grad_norm(parts: Parts) -> float:
    """The global L2 norm of the averaged gradients (read at log steps only: it syncs a GPU)."""
    grads = [p.grad for p in parts.model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    # torch.nn.utils.get_total_norm (torch >= 2.6) in what torch 2.4 has: one fused kernel for
    # the per-tensor norms, then the norm of those.
    norms = torch._foreach_norm(grads, 2.0)
    norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).item()
    # Under fp16 the gradients are still multiplied by the loss scale here.
    return norm / parts.scaler.get_scale() if parts.scaler.is_enabled() else norm


def grads_are_finite(model: nn.Module) -> bool:
    """After aggregation every rank holds the same averaged gradient, so all ranks agree."""
    return all_finite([p.grad for p in model.parameters() if p.grad is not None])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    # One fused norm per device instead of an isfinite per tensor: NaN/inf anywhere propagates.
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())

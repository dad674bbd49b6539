"""The training loop each worker runs on its shard: the textbook step, epochs, evaluation.

Nothing here knows how many workers there are or how gradients travel: that is the aggregator's
business. Metrics leave through `report`, a callable that ships a record to the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distrain.aggregators.base import GradientAggregator
from distrain.data.batches import Batch, ShardBatches

Report = Callable[[dict[str, Any]], None]


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
    task: str  # classification | regression


def train_step(parts: Parts, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the local batch; returns the local mean loss (detached)."""
    model, optimizer, aggregator, scaler = (
        parts.train_model,
        parts.optimizer,
        parts.aggregator,
        parts.scaler,
    )
    micro_batches = list(zip(x.split(parts.micro_batch_size), y.split(parts.micro_batch_size)))
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=x.device)
    for i, (x_micro, y_micro) in enumerate(micro_batches):
        # Gradients are only communicated on the last micro-batch (accumulation without traffic).
        with aggregator.sync_if(i == len(micro_batches) - 1), parts.autocast():
            loss = parts.loss_fn(model(x_micro), y_micro) / len(micro_batches)
        scaler.scale(loss).backward()
        total_loss += loss.detach().float()
    aggregator.synchronize()
    scaler.step(optimizer)
    scaler.update()
    if parts.scheduler is not None:
        parts.scheduler.step()
    return total_loss


@torch.no_grad()
def evaluate(parts: Parts, batches: Iterable[Batch]) -> dict[str, float]:
    """Sums over this worker's validation shard; the driver adds the workers' sums together."""
    parts.model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        with parts.autocast():
            out = parts.model(x)
            loss = parts.loss_fn(out, y)
        loss_sum += loss.float().item() * len(x)
        if parts.task == "classification":
            correct += (out.argmax(dim=1) == y).sum().item()
        count += len(x)
    parts.model.train()
    return {"val_loss_sum": loss_sum, "val_correct": correct, "val_count": count}


def fit(
    parts: Parts,
    *,
    epochs: int,
    max_steps: int | None,
    log_every_n_steps: int,
    report: Report,
) -> int:
    """Train `epochs` epochs (or until `max_steps`), reporting step and epoch records.

    Returns the number of optimizer steps taken.
    """
    batches = parts.batches
    step = 0
    total_steps = epochs * batches.steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    parts.train_model.train()
    for epoch in range(epochs):
        if step >= total_steps:
            break
        epoch_start = time.perf_counter()
        # Losses stay on the device and are read (.item(), a GPU sync) only when reported.
        epoch_loss = torch.zeros((), device=batches.device)
        interval_loss, interval_steps = torch.zeros((), device=batches.device), 0
        timings = {"data_s": 0.0, "compute_s": 0.0}
        interval_start = tick = time.perf_counter()
        epoch_steps = 0
        for x, y in batches.train_batches(epoch):
            timings["data_s"] += time.perf_counter() - tick
            compute_start = time.perf_counter()
            loss = train_step(parts, x, y)
            timings["compute_s"] += time.perf_counter() - compute_start
            step += 1
            epoch_steps += 1
            epoch_loss += loss
            interval_loss += loss
            interval_steps += 1
            if step % log_every_n_steps == 0 or step == total_steps:
                now = time.perf_counter()
                report(
                    {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": (interval_loss / interval_steps).item(),
                        "lr": parts.optimizer.param_groups[0]["lr"],
                        "samples": interval_steps * batches.local_batch,
                        "interval_s": now - interval_start,
                        **timings,
                    }
                )
                interval_loss.zero_()
                interval_steps = 0
                timings = {"data_s": 0.0, "compute_s": 0.0}
                interval_start = now
            if step >= total_steps:
                break
            tick = time.perf_counter()
        train_s = time.perf_counter() - epoch_start
        report(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "train_loss_sum": epoch_loss.item(),
                "train_batches": epoch_steps,
                "samples": epoch_steps * batches.local_batch,
                "train_s": train_s,
                **evaluate(parts, batches.val_batches()),
            }
        )
    return step

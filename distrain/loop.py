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
from distrain.histograms import model_histograms
from distrain.timing import StepClock

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
    num_outputs: int = 0  # classes of a classification task (top-5 accuracy when > 5)


def train_step(
    parts: Parts,
    x: torch.Tensor,
    y: torch.Tensor,
    clock: StepClock | None = None,
    inspect: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One optimizer step on the local batch; returns the local mean loss (detached).

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
    micro_batches = list(zip(x.split(parts.micro_batch_size), y.split(parts.micro_batch_size)))
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=x.device)
    for i, (x_micro, y_micro) in enumerate(micro_batches):
        # Gradients are only communicated on the last micro-batch (accumulation without traffic).
        with aggregator.sync_if(i == len(micro_batches) - 1), parts.autocast():
            loss = parts.loss_fn(model(x_micro), y_micro) / len(micro_batches)
        scaler.scale(loss).backward()
        total_loss += loss.detach().float()
    clock.lap("forward_backward_s")
    aggregator.synchronize()
    clock.lap("aggregation_wait_s")
    # DDP all-reduces inside backward: the time backward sat waiting for it is waiting too.
    clock.shift("forward_backward_s", "aggregation_wait_s", aggregator.backward_wait_s())
    if inspect is not None:
        inspect()
        clock.restart()  # logging work is nobody's step time
    scaler.step(optimizer)
    scaler.update()
    if parts.scheduler is not None:
        parts.scheduler.step()
    clock.lap("optimizer_s")
    return total_loss


def grad_norm(parts: Parts) -> float:
    """The global L2 norm of the averaged gradients (read at log steps only: it syncs a GPU)."""
    grads = [p.grad for p in parts.model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads).item()
    # Under fp16 the gradients are still multiplied by the loss scale here.
    return norm / parts.scaler.get_scale() if parts.scaler.is_enabled() else norm


@torch.no_grad()
def evaluate(parts: Parts, batches: Iterable[Batch]) -> dict[str, float]:
    """Sums over this worker's validation shard; the driver adds the workers' sums together."""
    parts.model.eval()
    device = parts.batches.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_top5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for x, y in batches:
        with parts.autocast():
            out = parts.model(x)
            loss = parts.loss_fn(out, y)
        loss_sum += loss.double() * len(x)
        if parts.task == "classification":
            correct += (out.argmax(dim=1) == y).sum()
            if out.shape[1] > 5:  # top-5 only means something with more than 5 classes
                correct_top5 += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
        count += len(x)
    parts.model.train()
    sums = {"val_loss_sum": loss_sum.item(), "val_correct": int(correct), "val_count": count}
    if parts.task == "classification" and parts.num_outputs > 5:
        sums["val_correct_top5"] = int(correct_top5)
    return sums


def _inspector(
    parts: Parts, grad_norm_now: bool, histograms_now: bool, out: dict[str, Any]
) -> Callable[[], None] | None:
    """What to look at between aggregation and the optimizer step, on this step only."""
    if not (grad_norm_now or histograms_now):
        return None

    def inspect() -> None:
        if grad_norm_now:
            out["grad_norm"] = grad_norm(parts)
        if histograms_now:
            out["histograms"] = model_histograms(parts.model)

    return inspect


def fit(
    parts: Parts,
    *,
    epochs: int,
    max_steps: int | None,
    log_every_n_steps: int,
    report: Report,
    histogram_every_n_steps: int = 0,
    debug_delay_s: float = 0.0,
) -> int:
    """Train `epochs` epochs (or until `max_steps`), reporting step and epoch records.

    Every `log_every_n_steps` a "step" record carries the interval's mean loss, lr, gradient norm,
    samples and the time per phase (distrain/timing.py); every `histogram_every_n_steps` (0: never)
    a "histograms" record carries weight and gradient histograms. `debug_delay_s` is test-only:
    a sleep per step, counted as data time, that turns this worker into a straggler.
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
        clock = StepClock()
        interval_start = time.perf_counter()
        epoch_steps = 0
        for x, y in batches.train_batches(epoch):
            if debug_delay_s:
                time.sleep(debug_delay_s)
            clock.lap("data_s")
            log_now = (step + 1) % log_every_n_steps == 0 or step + 1 == total_steps
            histograms_now = histogram_every_n_steps and (step + 1) % histogram_every_n_steps == 0
            inspected: dict[str, Any] = {}
            inspect = _inspector(parts, log_now, bool(histograms_now), inspected)
            loss = train_step(parts, x, y, clock, inspect)
            step += 1
            epoch_steps += 1
            epoch_loss += loss
            interval_loss += loss
            interval_steps += 1
            if histograms_now:
                report({"kind": "histograms", "step": step, "histograms": inspected["histograms"]})
            if log_now:
                now = time.perf_counter()
                report(
                    {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": (interval_loss / interval_steps).item(),
                        "lr": parts.optimizer.param_groups[0]["lr"],
                        "grad_norm": inspected["grad_norm"],
                        "samples": interval_steps * batches.local_batch,
                        "steps": interval_steps,
                        "interval_s": now - interval_start,
                        **clock.pop(),
                    }
                )
                interval_loss.zero_()
                interval_steps = 0
                interval_start = now
            if step >= total_steps:
                break
            clock.restart()
        train_s = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        sums = evaluate(parts, batches.val_batches())
        report(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "train_loss_sum": epoch_loss.item(),
                "train_batches": epoch_steps,
                "samples": epoch_steps * batches.local_batch,
                "train_s": train_s,
                "eval_s": time.perf_counter() - eval_start,
                **sums,
            }
        )
    return step

"""The training loop each worker runs on its shard: the textbook step, epochs, evaluation.

Nothing here knows how many workers there are or how gradients travel: that is the aggregator's
business. Metrics leave through `report`, a callable that ships a record to the driver.
"""

from __future__ import annotations

import math
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
from distrain.plan import StepPlan
from distrain.timing import StepClock, make_clock

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


def train_step(
    parts: Parts,
    x: torch.Tensor,
    y: torch.Tensor,
    clock: StepClock | None = None,
    inspect: Callable[[], None] | None = None,
    *,
    skip_non_finite: bool = False,
) -> tuple[torch.Tensor, bool]:
    """One optimizer step on the local batch.

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
    optimizer.zero_grad(set_to_none=True)
    total_loss: torch.Tensor | None = None
    for i, (x_micro, y_micro) in enumerate(micro_batches):
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
    clock.shift("forward_backward_s", "aggregation_wait_s", aggregator.backward_wait_s())
    if inspect is not None:
        inspect()
        clock.restart()  # logging work is nobody's step time
    # fp16's scaler skips non-finite steps by itself (that is its job). Otherwise the averaged
    # gradient is checked here only when a bad step is to be skipped: the check costs a sync per
    # step on a GPU and ~20 % of a small CPU step. Under nan_policy=stop `fit` checks the loss
    # and the parameters at log steps and boundaries instead.
    finite = not skip_non_finite or scaler.is_enabled() or grads_are_finite(parts.model)
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


@torch.no_grad()
def evaluate(parts: Parts, batches: Iterable[Batch]) -> dict[str, float]:
    """Sums over this worker's validation shard; the driver adds the workers' sums together."""
    parts.model.eval()
    device = parts.batches.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_top5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    per_token = parts.task == "language_model"  # the loss is a mean over every token
    # Under FSDP the forward is a collective: the aggregator pads ranks with empty batches.
    for x, y in parts.aggregator.eval_batches(batches):
        with parts.autocast():
            out = parts.model(x)
        if not len(x):  # a padding batch: forward only, nothing to count
            continue
        with parts.autocast():
            loss = parts.loss_fn(out, y)
        n = y.numel() if per_token else len(x)
        loss_sum += loss.double() * n
        if parts.task == "classification":
            correct += (out.argmax(dim=1) == y).sum()
            if out.shape[1] > 5:  # top-5 only means something with more than 5 classes
                correct_top5 += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
        count += n
    parts.model.train()
    sums = {"val_loss_sum": loss_sum.item(), "val_correct": int(correct), "val_count": count}
    if per_token and parts.bytes_per_token:
        sums["val_bytes"] = count * parts.bytes_per_token
    if parts.task == "classification" and parts.num_outputs > 5:
        sums["val_correct_top5"] = int(correct_top5)
    return sums


def _throughput(parts: Parts, samples: int) -> dict[str, float]:
    """Tokens and model FLOPs of `samples` trained samples, and the peak (language models)."""
    if not parts.tokens_per_sample:
        return {}
    tokens = samples * parts.tokens_per_sample
    return {
        "tokens": tokens,
        "flops": tokens * parts.flops_per_token,
        "peak_flops_per_s": parts.peak_flops_per_s,
    }


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


@dataclass
class Position:
    """Where training stands: what a checkpoint records and a resume starts from."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps of `epoch` done
    epoch_loss_sum: float = 0.0  # this rank's share of the epoch's summed step losses so far
    epoch_batches: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (trainer.nan_policy=skip_step)


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient under trainer.nan_policy=stop (not retried: it would recur)."""


# Called at every checkpoint boundary with the position there, whether it ends an epoch and
# whether it is the last of the run; True means "stop now".
Boundary = Callable[[Position, bool, bool], bool]


def grads_are_finite(model: nn.Module) -> bool:
    """After aggregation every rank holds the same averaged gradient, so all ranks agree."""
    return _all_finite([p.grad for p in model.parameters() if p.grad is not None])


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # One fused norm per device instead of an isfinite per tensor: NaN/inf anywhere propagates.
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def _check_finite(parts: Parts, interval_loss: float, step: int, epoch: int) -> None:
    """nan_policy=stop: a NaN/inf loss or gradient shows up as a non-finite loss or parameter.

    Checked at log steps and before every checkpoint, not every step (see train_step), so no
    checkpoint ever holds a non-finite model. The parameters are the same on every rank, so
    all ranks stop together.
    """
    if math.isfinite(interval_loss) and _all_finite(list(parts.model.parameters())):
        return
    raise NonFiniteError(
        f"by step {step} (epoch {epoch + 1}): the loss or the averaged gradient is NaN or inf. "
        "Lower optimizer.lr, check the data for NaN/inf, or set trainer.nan_policy=skip_step "
        "to skip such steps."
    )


def fit(
    parts: Parts,
    *,
    plan: StepPlan,
    log_every_n_steps: int,
    checkpoint_every_n_steps: int | None,
    nan_policy: str,
    heartbeat_s: float,
    start: Position,
    at_boundary: Boundary,
    report: Report,
    histogram_every_n_steps: int = 0,
    debug_delay_s: float = 0.0,
) -> tuple[Position, bool]:
    """Train from `start` to the plan's last step, reporting step and epoch records.

    Every `log_every_n_steps` a "step" record carries the interval's mean loss, lr, gradient norm,
    samples and the time per phase (distrain/timing.py); every `histogram_every_n_steps` (0: never)
    a "histograms" record carries weight and gradient histograms. Checkpoint boundaries are every
    `checkpoint_every_n_steps` steps and every epoch end; there `at_boundary` may capture a
    checkpoint and decide to stop. `debug_delay_s` is test-only: a sleep per step, counted as data
    time, that turns this worker into a straggler. Returns the final position and whether
    training stopped early.
    """
    batches = parts.batches
    pos = Position(**vars(start))
    epochs, total_steps, steps_per_epoch = plan.epochs, plan.total_steps, plan.steps_per_epoch
    last_report_s = time.monotonic()

    def send(record: dict[str, Any]) -> None:
        nonlocal last_report_s
        report(record)
        last_report_s = time.monotonic()

    parts.train_model.train()
    while pos.epoch < epochs and pos.step < total_steps:
        epoch, epoch_start, epoch_steps = pos.epoch, time.perf_counter(), 0
        # Losses stay on the device and are read (.item(), a GPU sync) only when reported.
        epoch_loss = torch.zeros((), device=batches.device)
        interval_loss, interval_steps = torch.zeros((), device=batches.device), 0
        interval_finite = 0  # steps of the interval whose loss counts (not skipped as NaN/inf)
        clock = make_clock(batches.device)  # GPU time (CUDA events) on a GPU
        interval_start = time.perf_counter()
        for x, y in batches.train_batches(epoch, pos.step_in_epoch):
            if debug_delay_s:
                time.sleep(debug_delay_s)
            clock.lap("data_s")
            next_step = pos.step + 1
            log_now = next_step % log_every_n_steps == 0 or next_step == total_steps
            histograms_now = bool(
                histogram_every_n_steps and next_step % histogram_every_n_steps == 0
            )
            inspected: dict[str, Any] = {}
            inspect = _inspector(parts, log_now, histograms_now, inspected)
            loss, finite = train_step(
                parts, x, y, clock, inspect, skip_non_finite=nan_policy == "skip_step"
            )
            pos.step, pos.step_in_epoch, epoch_steps = (
                next_step,
                pos.step_in_epoch + 1,
                epoch_steps + 1,
            )
            if not finite:  # only under nan_policy=skip_step
                pos.skipped_steps += 1
            else:
                epoch_loss += loss
                interval_loss += loss
                pos.epoch_batches += 1
                interval_finite += 1
            interval_steps += 1
            if histograms_now:
                send(
                    {"kind": "histograms", "step": pos.step, "histograms": inspected["histograms"]}
                )
            if log_now:
                mean_loss = (interval_loss / max(interval_finite, 1)).item()
                now = time.perf_counter()  # after the .item() above synchronized the device
                if nan_policy == "stop":
                    _check_finite(parts, mean_loss, pos.step, epoch)
                send(
                    {
                        "kind": "step",
                        "step": pos.step,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": parts.optimizer.param_groups[0]["lr"],
                        "grad_norm": inspected["grad_norm"],
                        "samples": interval_steps * batches.local_batch,
                        "steps": interval_steps,
                        "interval_s": now - interval_start,
                        "skipped_steps": pos.skipped_steps,
                        **_throughput(parts, interval_steps * batches.local_batch),
                        **clock.pop(),
                    }
                )
                interval_loss.zero_()
                interval_steps = interval_finite = 0
                interval_start = now
            elif time.monotonic() - last_report_s > heartbeat_s:
                send({"kind": "heartbeat", "step": pos.step})
            if pos.step >= total_steps or pos.step_in_epoch == steps_per_epoch:
                break
            if checkpoint_every_n_steps and pos.step % checkpoint_every_n_steps == 0:
                pos.epoch_loss_sum += epoch_loss.item()
                epoch_loss.zero_()
                if nan_policy == "stop":
                    _check_finite(parts, pos.epoch_loss_sum, pos.step, epoch)
                if at_boundary(pos, False, False):
                    return pos, True
            clock.restart()
        pos.epoch_loss_sum += epoch_loss.item()
        if nan_policy == "stop":
            _check_finite(parts, pos.epoch_loss_sum, pos.step, epoch)
        train_s = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        sums = evaluate(parts, batches.val_batches())
        epoch_record = {
            "kind": "epoch",
            "epoch": epoch,
            "step": pos.step,
            "train_loss_sum": pos.epoch_loss_sum,
            "train_batches": pos.epoch_batches,
            "samples": epoch_steps * batches.local_batch,  # trained in this session
            "train_s": train_s,
            "eval_s": time.perf_counter() - eval_start,
            **_throughput(parts, epoch_steps * batches.local_batch),
            **sums,
        }
        if parts.sample is not None:  # a language model: a few lines from a prompt
            lines = parts.sample()  # None on the ranks that only take part (FSDP)
            if lines is not None:
                send({"kind": "sample", "step": pos.step, "epoch": epoch, "text": lines})
        if pos.step_in_epoch == steps_per_epoch:  # not when max_steps ended it early
            pos = Position(step=pos.step, epoch=epoch + 1, skipped_steps=pos.skipped_steps)
        # The epoch-end checkpoint is captured before the epoch is reported, so the driver has
        # written it by the time the epoch shows in TensorBoard: a resume never logs it twice.
        stop = at_boundary(pos, True, pos.epoch >= epochs or pos.step >= total_steps)
        send(epoch_record)
        if stop:
            return pos, pos.epoch < epochs and pos.step < total_steps
    return pos, False

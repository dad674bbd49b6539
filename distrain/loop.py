"""The training loop each worker runs on its shard: epochs of `train_step`, evaluation, reports.

Nothing here knows how many workers there are or how gradients travel: that is the aggregator's
business (the step itself is in distrain/step.py). Metrics leave through `report`, a callable
that ships a record to the driver.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from distrain.evaluation import evaluate
from distrain.histograms import model_histograms
from distrain.plan import StepPlan
from distrain.profiling import NoProfiler, StepProfiler, profiled_steps
from distrain.records import (
    EpochRecord,
    EvalRecord,
    Heartbeat,
    HistogramRecord,
    Record,
    SampleRecord,
    StepRecord,
    Throughput,
)
from distrain.step import Parts, all_finite, grad_norm, train_step
from distrain.timing import StepClock, make_clock

Report = Callable[[Record], None]
Profiler = StepProfiler | NoProfiler  # what `fit` steps along (distrain/profiling.py)


def _throughput(parts: Parts, samples: int) -> Throughput | None:
    """Tokens and model FLOPs of `samples` trained samples, and the peak (language models)."""
    if not parts.tokens_per_sample:
        return None
    tokens = samples * parts.tokens_per_sample
    return Throughput(tokens, tokens * parts.flops_per_token, parts.peak_flops_per_s)


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
    # The epoch's losses since `epoch_loss_sum` was last updated, still on the device (reading
    # them is a sync): `settle()` adds them in, e.g. after a failure, before healing.
    unsettled_loss: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def plain(self) -> dict[str, Any]:
        """The position as plain numbers (a checkpoint's header)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "unsettled_loss"}

    def settle(self) -> None:
        if self.unsettled_loss is not None:
            self.epoch_loss_sum += self.unsettled_loss.item()
            self.unsettled_loss.zero_()

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_batches, self.unsettled_loss = 0.0, 0, None


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient under trainer.nan_policy=stop (not retried: it would recur)."""


class Boundary(Protocol):
    """Called at every checkpoint boundary with the position there; True means "stop now"."""

    def __call__(self, position: Position, *, epoch_end: bool, final: bool) -> bool: ...


# Asked after each step that is not a checkpoint boundary, where a group may pause to grow back
# in place (True: stop now).
StepBoundary = Callable[[Position], bool]


@dataclass(frozen=True)
class Cadence:
    """How often `fit` reports, checks and checkpoints (from trainer.* and logger.*)."""

    log_every_n_steps: int  # a "step" record: the interval's loss, lr, gradient norm, timings
    checkpoint_every_n_steps: int | None  # boundaries besides every epoch end (None: none)
    heartbeat_s: float  # a "heartbeat" record when nothing else was sent for this long
    nan_policy: str = "stop"  # stop: raise NonFiniteError; skip_step: skip and count the step
    histogram_every_n_steps: int = 0  # a "histograms" record (0: never)
    eval_every_n_steps: int | None = None  # an evaluation inside the epoch (None: at its end only)
    slow_step_s: float = 0.0  # DISTRAIN_SLOW_RANK: a sleep per step (a straggler), as data time
    profile_steps: int = 0  # steps recorded by torch.profiler (0: none; distrain/profiling.py)
    profile_after_step: int = 0  # ... after this many


def _stop_if_non_finite(parts: Parts, cadence: Cadence, loss_sum: float, pos: Position) -> None:
    """nan_policy=stop: a NaN/inf loss or gradient shows up as a non-finite loss or parameter.

    Checked at log steps and before every checkpoint, not every step (see train_step), so no
    checkpoint ever holds a non-finite model. The parameters are the same on every rank, so
    all ranks stop together.
    """
    if cadence.nan_policy != "stop":
        return
    if math.isfinite(loss_sum) and all_finite(list(parts.model.parameters())):
        return
    raise NonFiniteError(
        f"by step {pos.step} (epoch {pos.epoch + 1}): the loss or the averaged gradient is NaN or "
        "inf. Lower optimizer.lr, clip the gradient (e.g. trainer.max_grad_norm=1.0), check the "
        "data for NaN/inf, or set trainer.nan_policy=skip_step to skip such steps."
    )


def fit(
    parts: Parts,
    *,
    plan: StepPlan,
    cadence: Cadence,
    pos: Position,
    at_boundary: Boundary,
    report: Report,
    at_step: StepBoundary | None = None,
) -> bool:
    """Train from `pos` to the plan's last step, reporting step and epoch records.

    `pos` advances in place after every step: if a step fails (a peer died), the caller still
    knows the last completed one. Checkpoint boundaries are every
    `cadence.checkpoint_every_n_steps` steps and every epoch end; there `at_boundary` may capture
    a checkpoint and decide to stop; `at_step`, if given, may stop after any step between them.
    Returns whether training stopped early.
    """
    outbox = _Outbox(report, cadence.heartbeat_s)
    parts.train_model.train()
    profile = cadence.profile_steps, cadence.profile_after_step
    with profiled_steps(*profile, parts.batches.device, outbox.send) as profiler:
        while pos.epoch < plan.epochs and pos.step < plan.total_steps:
            epoch, started_s = pos.epoch, time.perf_counter()
            steps, stopped, evaluated_s = _train_epoch(
                parts, plan, cadence, pos, (at_boundary, at_step), outbox, profiler
            )
            if stopped:
                return True
            train_s = time.perf_counter() - started_s - evaluated_s
            record = _evaluate_epoch(parts, pos, steps, train_s)
            if parts.sample is not None:  # a language model: a few lines from a prompt
                lines = parts.sample()  # None on the ranks that only take part (FSDP)
                if lines is not None:
                    outbox.send(SampleRecord(step=pos.step, epoch=epoch, text=lines))
            if pos.step_in_epoch == plan.steps_per_epoch:  # not when max_steps ended it early
                pos.next_epoch()
            # The epoch-end checkpoint is captured before the epoch is reported, so the driver has
            # written it by the time the epoch shows in TensorBoard: a resume never logs it twice.
            final = pos.epoch >= plan.epochs or pos.step >= plan.total_steps
            stop = at_boundary(pos, epoch_end=True, final=final)
            outbox.send(record)
            if stop:
                return not final
        return False


def _train_epoch(
    parts: Parts,
    plan: StepPlan,
    cadence: Cadence,
    pos: Position,
    boundaries: tuple[Boundary, StepBoundary | None],
    outbox: _Outbox,
    profiler: Profiler,
) -> tuple[int, bool, float]:
    """The steps of `pos.epoch` from `pos` (advanced in place): how many, whether to stop, and
    the seconds spent in evaluations inside the epoch (trainer.eval_every_n_steps)."""
    device, (at_boundary, at_step) = parts.batches.device, boundaries
    epoch_loss = torch.zeros((), device=device)  # losses stay on the device until read
    pos.unsettled_loss = epoch_loss
    interval, steps, evaluated_s = _Interval(device), 0, 0.0
    # Started after the interval, so the phases' laps fall inside its wall time (a worker
    # descheduled between the two would otherwise count that pause in its first data lap only).
    clock = make_clock(device)  # GPU time (CUDA events) on a GPU
    for x, y in parts.batches.train_batches(pos.epoch, pos.step_in_epoch):
        if cadence.slow_step_s:
            time.sleep(cadence.slow_step_s)
        clock.lap("data_s")
        step = pos.step + 1
        log_now = step % cadence.log_every_n_steps == 0 or step == plan.total_steps
        every = cadence.histogram_every_n_steps
        histograms_now = bool(every and step % every == 0)
        inspected: dict[str, Any] = {}
        inspect = _inspector(parts, log_now, histograms_now, inspected)
        skip = cadence.nan_policy == "skip_step"
        loss, finite = train_step(parts, x, y, clock, inspect, skip_non_finite=skip, step=pos.step)
        pos.step, pos.step_in_epoch, steps = step, pos.step_in_epoch + 1, steps + 1
        profiler.step(step)
        interval.add(loss, finite)
        if finite:
            epoch_loss += loss
            pos.epoch_batches += 1
        else:  # only under nan_policy=skip_step
            pos.skipped_steps += 1
        if histograms_now:
            outbox.send(HistogramRecord(step=step, histograms=inspected["histograms"]))
        if log_now:
            record = interval.close(parts, pos, inspected["grad_norm"], clock)
            _stop_if_non_finite(parts, cadence, record.loss, pos)
            outbox.send(record)
        else:
            outbox.beat(step)
        if pos.step >= plan.total_steps or pos.step_in_epoch == plan.steps_per_epoch:
            break  # the epoch's own evaluation follows
        if cadence.eval_every_n_steps and step % cadence.eval_every_n_steps == 0:
            record = _evaluate_now(parts, pos)
            outbox.send(record)
            evaluated_s += record.eval_s
            interval.started_s += record.eval_s  # evaluating is nobody's step time
        if cadence.checkpoint_every_n_steps and step % cadence.checkpoint_every_n_steps == 0:
            pos.settle()
            _stop_if_non_finite(parts, cadence, pos.epoch_loss_sum, pos)
            if at_boundary(pos, epoch_end=False, final=False):
                return steps, True, evaluated_s
        elif at_step is not None and at_step(pos):
            pos.settle()
            return steps, True, evaluated_s
        clock.restart()
    pos.settle()
    pos.unsettled_loss = None
    _stop_if_non_finite(parts, cadence, pos.epoch_loss_sum, pos)
    return steps, False, evaluated_s


def _evaluate_now(parts: Parts, pos: Position) -> EvalRecord:
    """This rank's validation shard at a step inside the epoch (every rank evaluates at the same
    step, so a strategy whose forward is a collective stays in lock-step)."""
    started_s = time.perf_counter()
    validation = evaluate(parts, parts.batches.val_batches())
    eval_s = time.perf_counter() - started_s
    return EvalRecord(step=pos.step, epoch=pos.epoch, eval_s=eval_s, validation=validation)


def _evaluate_epoch(parts: Parts, pos: Position, steps: int, train_s: float) -> EpochRecord:
    """This rank's epoch: its training sums and its validation shard's."""
    started_s = time.perf_counter()
    validation = evaluate(parts, parts.batches.val_batches())
    samples = steps * parts.batches.local_batch  # trained in this session
    return EpochRecord(
        epoch=pos.epoch,
        step=pos.step,
        train_loss_sum=pos.epoch_loss_sum,
        train_batches=pos.epoch_batches,
        samples=samples,
        train_s=train_s,
        eval_s=time.perf_counter() - started_s,
        validation=validation,
        throughput=_throughput(parts, samples),
    )


class _Outbox:
    """Records to the driver, and a heartbeat when nothing else was sent for `heartbeat_s`."""

    def __init__(self, report: Report, heartbeat_s: float) -> None:
        self.report, self.heartbeat_s = report, heartbeat_s
        self.last_sent_s = time.monotonic()

    def send(self, record: Record) -> None:
        self.report(record)
        self.last_sent_s = time.monotonic()

    def beat(self, step: int) -> None:
        if time.monotonic() - self.last_sent_s > self.heartbeat_s:
            self.send(Heartbeat(step=step))


class _Interval:
    """The steps since the last "step" record; their losses stay on the device until then."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.finite_steps = 0  # finite: steps whose loss counts (not skipped)
        self.started_s = time.perf_counter()

    def add(self, loss: torch.Tensor, finite: bool) -> None:
        self.steps += 1
        if finite:
            self.loss += loss
            self.finite_steps += 1

    def close(self, parts: Parts, pos: Position, grad_norm: float, clock: StepClock) -> StepRecord:
        """The interval's record (reads the loss: a device sync); starts the next one."""
        mean_loss = (self.loss / max(self.finite_steps, 1)).item()
        now_s = time.perf_counter()  # after the .item() above synchronized the device
        samples = self.steps * parts.batches.local_batch
        record = StepRecord(
            step=pos.step,
            epoch=pos.epoch,
            loss=mean_loss,
            lr=parts.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            samples=samples,
            steps=self.steps,
            interval_s=now_s - self.started_s,
            skipped_steps=pos.skipped_steps,
            phases_s=clock.pop(),
            cpu_wait_s=clock.pop_cpu_wait(),
            throughput=_throughput(parts, samples),
        )
        self.loss.zero_()
        self.steps = self.finite_steps = 0
        self.started_s = now_s
        return record

"""Turn per-rank records into global figures: a step's or an epoch's numbers over all workers.

Workers report sums (loss sums, correct counts, sample counts, seconds per phase) rather than
means, so the global figure is exact whatever the shard sizes: validation accuracy is the true
accuracy over every validation sample.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distrain.records import (
    EpochRecord,
    EvalRecord,
    HistogramRecord,
    ProfileRecord,
    Record,
    SampleRecord,
    StepRecord,
    Throughput,
    ValidationSums,
)
from distrain.timing import BUSY_PHASES, PHASES

R = TypeVar("R", StepRecord, EpochRecord, EvalRecord)  # the records that every rank reports


@dataclass
class WorkerFigures:
    """One rank over one logging interval, per step."""

    busy_s: float  # data + forward/backward + optimizer: the step time this worker needs alone
    samples_per_s: float  # local samples / busy time: the rate this worker could sustain alone
    phases_s: dict[str, float]  # seconds per step in each phase of distrain/timing.py
    tokens_per_s: float | None = None  # language models: local tokens / busy time
    mfu: float | None = None  # model FLOPs / busy time / this worker's peak FLOP/s
    cpu_wait_s: float | None = None  # of busy_s, waiting for a CPU core others held (timing.py)


@dataclass
class StepMetrics:
    step: int
    epoch: int
    loss: float  # mean of the workers' mean losses over the logging interval
    lr: float
    grad_norm: float  # L2 norm of the averaged gradient at the logged step
    samples_per_s: float  # global: all workers' samples / the interval's wall time
    step_s: float  # wall time per step over the interval (the slowest rank's)
    phases_s: dict[str, float]  # seconds per step in each phase, mean over the workers
    workers: dict[int, WorkerFigures]
    per_rank: dict[int, StepRecord] = field(repr=False)
    tokens_per_s: float | None = None  # language models: all workers' tokens / wall time
    mfu: float | None = None  # all workers' model FLOP/s over the sum of their peaks

    @property
    def slowest_to_fastest(self) -> float:
        busy = [w.busy_s for w in self.workers.values()]
        return max(busy) / max(min(busy), 1e-12)


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # top-1; None for regression
    train_s: float
    samples: int
    val_top5_accuracy: float | None = None  # classification with more than 5 classes
    eval_s: float = 0.0
    # Language models: val_loss is nats per token; bits per byte when bytes per token is known.
    val_bits_per_byte: float | None = None
    tokens: int = 0
    mfu: float | None = None
    worker_tokens_per_s: list[float] | None = None  # by rank: its tokens / its training time
    # Ranks that died after the epoch's last step but before reporting it (healed in place): the
    # figures are the other ranks' (their training and validation shards) only.
    missing_ranks: list[int] | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.train_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_s, 1e-9)

    @property
    def val_perplexity(self) -> float:
        return perplexity(self.val_loss)

    def evaluation(self) -> EvalMetrics:
        """The epoch's evaluation as one at its last step (TensorBoard's `val/...` series)."""
        return EvalMetrics(
            step=self.step,
            epoch=self.epoch,
            val_loss=self.val_loss,
            val_accuracy=self.val_accuracy,
            val_top5_accuracy=self.val_top5_accuracy,
            val_bits_per_byte=self.val_bits_per_byte,
            eval_s=self.eval_s,
            val_perplexity=self.val_perplexity if self.tokens else None,
        )


@dataclass
class EvalMetrics:
    """An evaluation at a step, over every worker's shard: inside an epoch
    (trainer.eval_every_n_steps), or an epoch's own (`EpochMetrics.evaluation`)."""

    step: int
    epoch: int
    val_loss: float
    val_accuracy: float | None
    val_top5_accuracy: float | None
    val_bits_per_byte: float | None
    eval_s: float
    val_perplexity: float | None = None  # language models
    missing_ranks: list[int] | None = None  # as for EpochMetrics: died before reporting it


@dataclass
class SampleMetrics:
    step: int
    text: list[str]  # rank 0's continuations of the fixed prompt


@dataclass
class HistogramMetrics:
    step: int
    histograms: dict[str, dict[str, Any]]  # tag -> fields of distrain/histograms.py


class MetricsCollector:
    """Buffers records until every rank has reported a step/epoch, then yields the global one."""

    def __init__(self, world_size: int, task: str, epochs: list[EpochMetrics] | None = None):
        self.world_size = world_size
        self.task = task
        # step -> the ranks that have reported it; epoch -> likewise
        self._steps: dict[int, dict[int, StepRecord]] = defaultdict(dict)
        self._epochs: dict[int, dict[int, EpochRecord]] = defaultdict(dict)
        self._evals: dict[int, dict[int, EvalRecord]] = defaultdict(dict)  # by step
        # Shared with the supervisor, so the history survives restarts of the worker group.
        self.epochs: list[EpochMetrics] = epochs if epochs is not None else []

    def add(
        self, record: Record
    ) -> (
        StepMetrics
        | EpochMetrics
        | EvalMetrics
        | HistogramMetrics
        | SampleMetrics
        | ProfileRecord
        | None
    ):
        """A rank's figures; the global ones once every rank has reported them (None before,
        and for records that carry no figures)."""
        if isinstance(record, HistogramRecord):  # rank 0 only
            return HistogramMetrics(step=record.step, histograms=record.histograms)
        if isinstance(record, SampleRecord):  # rank 0 only
            return SampleMetrics(step=record.step, text=record.text)
        if isinstance(record, ProfileRecord):  # a file for the run directory, as it came
            return record
        if isinstance(record, StepRecord):
            ranks = self._complete(self._steps, record.step, record)
            return None if ranks is None else self._step(ranks)
        if isinstance(record, EpochRecord):
            ranks = self._complete(self._epochs, record.epoch, record)
            return None if ranks is None else self._epoch(ranks)
        if isinstance(record, EvalRecord):
            ranks = self._complete(self._evals, record.step, record)
            return None if ranks is None else self._eval(ranks)
        return None

    def _complete(
        self, pending: dict[int, dict[int, R]], key: int, record: R
    ) -> dict[int, R] | None:
        """`record` added to `pending[key]`; every rank's records of `key` once all are in."""
        ranks = pending[key]
        ranks[record.rank] = record
        if len(ranks) < self.world_size:
            return None
        return pending.pop(key)

    def complete_without(self, lost: frozenset[int]) -> list[EpochMetrics | EvalMetrics]:
        """Epochs and evaluations that only the `lost` ranks had not reported, completed from
        the others.

        A rank that dies after an epoch's last step (its all-reduce done) but before sending
        the epoch's record takes the record with it; the survivors, healed in place, go on from
        that step, so nothing would ever complete the epoch and TensorBoard would miss its point.
        The same holds for an evaluation inside an epoch.
        """
        done: list[EpochMetrics | EvalMetrics] = []
        for ranks, missing in self._pop_without(self._epochs, lost):
            epoch = self._epoch(ranks)
            epoch.missing_ranks = missing
            done.append(epoch)
        for ranks, missing in self._pop_without(self._evals, lost):
            evaluation = self._eval(ranks)
            evaluation.missing_ranks = missing
            done.append(evaluation)
        return done

    def _pop_without(
        self, pending: dict[int, dict[int, R]], lost: frozenset[int]
    ) -> list[tuple[dict[int, R], list[int]]]:
        """The entries of `pending` that only `lost` ranks had not reported (removed from it),
        each with the ranks it misses."""
        found = []
        for key in sorted(pending):
            missing = set(range(self.world_size)) - set(pending[key])
            if pending[key] and missing <= lost:
                found.append((pending.pop(key), sorted(missing)))
        return found

    def _step(self, ranks: dict[int, StepRecord]) -> StepMetrics:
        records = list(ranks.values())
        first = records[0]
        interval_s = max(r.interval_s for r in records)
        workers = {rank: _worker_figures(r) for rank, r in sorted(ranks.items())}
        metrics = StepMetrics(
            step=first.step,
            epoch=first.epoch,
            loss=sum(r.loss for r in records) / len(records),
            lr=first.lr,
            grad_norm=first.grad_norm,
            samples_per_s=sum(r.samples for r in records) / max(interval_s, 1e-9),
            step_s=interval_s / first.steps,
            phases_s={
                p: sum(w.phases_s[p] for w in workers.values()) / len(workers) for p in PHASES
            },
            workers=workers,
            per_rank=ranks,
        )
        throughputs = [r.throughput for r in records if r.throughput is not None]
        if throughputs:
            metrics.tokens_per_s = sum(t.tokens for t in throughputs) / max(interval_s, 1e-9)
            metrics.mfu = _mfu(throughputs, interval_s)
        return metrics

    def _validation(self, sums: list[ValidationSums]) -> dict[str, Any]:
        """Every shard's sums added, then divided once: the figures over the whole val set."""
        count = max(sum(v.count for v in sums), 1)
        loss_sum = sum(v.loss_sum for v in sums)
        top5 = [v.correct_top5 for v in sums if v.correct_top5 is not None]
        val_bytes = [v.bytes for v in sums if v.bytes is not None]
        classification = self.task == "classification"
        return {
            "val_loss": loss_sum / count,
            "val_accuracy": sum(v.correct for v in sums) / count if classification else None,
            "val_top5_accuracy": sum(top5) / count if top5 else None,
            # nats per token x tokens = nats; / ln 2 = bits
            "val_bits_per_byte": loss_sum / math.log(2) / sum(val_bytes) if val_bytes else None,
        }

    def _eval(self, ranks: dict[int, EvalRecord]) -> EvalMetrics:
        records = list(ranks.values())
        metrics = EvalMetrics(
            step=records[0].step,
            epoch=records[0].epoch,
            eval_s=max(r.eval_s for r in records),
            **self._validation([r.validation for r in records]),
        )
        if self.task == "language_model":
            metrics.val_perplexity = perplexity(metrics.val_loss)
        return metrics

    def _epoch(self, ranks: dict[int, EpochRecord]) -> EpochMetrics:
        records = list(ranks.values())
        metrics = EpochMetrics(
            epoch=records[0].epoch,
            step=records[0].step,
            train_loss=sum(r.train_loss_sum for r in records)
            / max(sum(r.train_batches for r in records), 1),
            train_s=max(r.train_s for r in records),
            eval_s=max(r.eval_s for r in records),
            samples=sum(r.samples for r in records),
            **self._validation([r.validation for r in records]),
        )
        throughputs = [r.throughput for r in records if r.throughput is not None]
        if throughputs:
            metrics.tokens = sum(t.tokens for t in throughputs)
            metrics.mfu = _mfu(throughputs, metrics.train_s)
            metrics.worker_tokens_per_s = [
                (r.throughput.tokens if r.throughput else 0) / max(r.train_s, 1e-9)
                for _, r in sorted(ranks.items())
            ]
        self.epochs.append(metrics)
        return metrics

    def summary(self) -> dict[str, Any]:
        """The run's final figures for metrics.json."""
        if not self.epochs:
            return {}
        last = self.epochs[-1]
        train_s = sum(e.train_s for e in self.epochs)
        summary: dict[str, Any] = {
            "epochs": last.epoch + 1,
            "steps": last.step,
            "train_loss": last.train_loss,
            "val_loss": last.val_loss,
            "best_val_loss": min(e.val_loss for e in self.epochs),
            # Training samples over the time spent in training loops (evaluation excluded).
            "samples_per_s": sum(e.samples for e in self.epochs) / max(train_s, 1e-9),
        }
        if last.val_accuracy is not None:
            summary["val_accuracy"] = last.val_accuracy
            summary["best_val_accuracy"] = max(e.val_accuracy or 0.0 for e in self.epochs)
        if last.val_top5_accuracy is not None:
            summary["val_top5_accuracy"] = last.val_top5_accuracy
            summary["best_val_top5_accuracy"] = max(e.val_top5_accuracy or 0.0 for e in self.epochs)
        if last.tokens:  # a language model
            summary["val_perplexity"] = last.val_perplexity
            summary["tokens_per_s"] = sum(e.tokens for e in self.epochs) / max(train_s, 1e-9)
            summary["worker_tokens_per_s"] = last.worker_tokens_per_s  # the last epoch's
            if last.mfu is not None:
                summary["mfu"] = last.mfu
        if last.val_bits_per_byte is not None:
            summary["val_bits_per_byte"] = last.val_bits_per_byte
        return summary


def perplexity(nats_per_token: float) -> float:
    """exp(loss); capped below exp's overflow (a diverged run's loss can be huge)."""
    return math.exp(min(nats_per_token, 700.0))


def _mfu(throughputs: list[Throughput], seconds: float) -> float | None:
    """Model FLOP/s of all workers over the sum of their peaks; None when a peak is unknown."""
    peaks = [t.peak_flops_per_s for t in throughputs]
    if not all(peaks):
        return None
    return sum(t.flops for t in throughputs) / max(seconds, 1e-9) / sum(peaks)


def _worker_figures(record: StepRecord) -> WorkerFigures:
    steps = max(record.steps, 1)
    phases_s = {p: record.phases_s[p] / steps for p in PHASES}
    busy_s = sum(phases_s[p] for p in BUSY_PHASES)
    figures = WorkerFigures(
        busy_s=busy_s,
        samples_per_s=record.samples / steps / max(busy_s, 1e-9),
        phases_s=phases_s,
        cpu_wait_s=None if record.cpu_wait_s is None else record.cpu_wait_s / steps,
    )
    throughput = record.throughput
    if throughput is not None:
        figures.tokens_per_s = throughput.tokens / steps / max(busy_s, 1e-9)
        if throughput.peak_flops_per_s:
            figures.mfu = throughput.flops / steps / max(busy_s, 1e-9) / throughput.peak_flops_per_s
    return figures

"""Turn per-rank records into global figures: a step's or an epoch's numbers over all workers.

Workers report sums (loss sums, correct counts, sample counts, seconds per phase) rather than
means, so the global figure is exact whatever the shard sizes: validation accuracy is the true
accuracy over every validation sample.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from distrain.timing import PHASES

# What a worker spends of a step on its own (not waiting for the others): comparing it across
# workers shows a straggler, since in synchronous training every worker's wall time is the same.
BUSY_PHASES = ("data_s", "forward_backward_s", "optimizer_s")


@dataclass
class WorkerFigures:
    """One rank over one logging interval, per step."""

    busy_s: float  # data + forward/backward + optimizer: the step time this worker needs alone
    samples_per_s: float  # local samples / busy time: the rate this worker could sustain alone
    phases_s: dict[str, float]  # seconds per step in each phase of distrain/timing.py
    tokens_per_s: float | None = None  # language models: local tokens / busy time
    mfu: float | None = None  # model FLOPs / busy time / this worker's peak FLOP/s


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
    per_rank: dict[int, dict[str, Any]] = field(repr=False)
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
        return math.exp(min(self.val_loss, 700.0))


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
        self._pending: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
        # Shared with the supervisor, so the history survives restarts of the worker group.
        self.epochs: list[EpochMetrics] = epochs if epochs is not None else []

    def add(
        self, record: dict[str, Any]
    ) -> StepMetrics | EpochMetrics | HistogramMetrics | SampleMetrics | None:
        kind = record["kind"]
        if kind == "histograms":  # rank 0 only
            return HistogramMetrics(step=record["step"], histograms=record["histograms"])
        if kind == "sample":  # rank 0 only
            return SampleMetrics(step=record["step"], text=record["text"])
        key = (kind, record["step"] if kind == "step" else record["epoch"])
        ranks = self._pending[key]
        ranks[record["rank"]] = record
        if len(ranks) < self.world_size:
            return None
        del self._pending[key]
        return self._step(ranks) if kind == "step" else self._epoch(ranks)

    def complete_without(self, lost: frozenset[int]) -> list[EpochMetrics]:
        """Epochs that only the `lost` ranks had not reported, completed from the others.

        A rank that dies after an epoch's last step (its all-reduce done) but before sending
        the epoch's record takes the record with it; the survivors, healed in place, go on from
        that step, so nothing would ever complete the epoch and TensorBoard would miss its point.
        """
        done = []
        for key in sorted(k for k in self._pending if k[0] == "epoch"):
            ranks = self._pending[key]
            missing = set(range(self.world_size)) - set(ranks)
            if ranks and missing <= lost:
                del self._pending[key]
                metrics = self._epoch(ranks)
                metrics.missing_ranks = sorted(missing)
                done.append(metrics)
        return done

    def _step(self, ranks: dict[int, dict[str, Any]]) -> StepMetrics:
        records = list(ranks.values())
        interval_s = max(r["interval_s"] for r in records)
        workers = {rank: _worker_figures(r) for rank, r in sorted(ranks.items())}
        metrics = StepMetrics(
            step=records[0]["step"],
            epoch=records[0]["epoch"],
            loss=sum(r["loss"] for r in records) / len(records),
            lr=records[0]["lr"],
            grad_norm=records[0]["grad_norm"],
            samples_per_s=sum(r["samples"] for r in records) / max(interval_s, 1e-9),
            step_s=interval_s / records[0]["steps"],
            phases_s={
                p: sum(w.phases_s[p] for w in workers.values()) / len(workers) for p in PHASES
            },
            workers=workers,
            per_rank=ranks,
        )
        if "tokens" in records[0]:
            metrics.tokens_per_s = sum(r["tokens"] for r in records) / max(interval_s, 1e-9)
            metrics.mfu = _mfu(records, interval_s)
        return metrics

    def _epoch(self, ranks: dict[int, dict[str, Any]]) -> EpochMetrics:
        records = list(ranks.values())
        total = {key: sum(r[key] for r in records) for key in records[0] if key != "kind"}
        count = max(total["val_count"], 1)
        classification = self.task == "classification"
        metrics = EpochMetrics(
            epoch=records[0]["epoch"],
            step=records[0]["step"],
            train_loss=total["train_loss_sum"] / max(total["train_batches"], 1),
            val_loss=total["val_loss_sum"] / count,
            val_accuracy=total["val_correct"] / count if classification else None,
            val_top5_accuracy=(
                total["val_correct_top5"] / count if "val_correct_top5" in total else None
            ),
            train_s=max(r["train_s"] for r in records),
            eval_s=max(r.get("eval_s", 0.0) for r in records),
            samples=total["samples"],
        )
        if "tokens" in total:
            metrics.tokens = total["tokens"]
            metrics.mfu = _mfu(records, metrics.train_s)
            metrics.worker_tokens_per_s = [
                ranks[r]["tokens"] / max(ranks[r]["train_s"], 1e-9) for r in sorted(ranks)
            ]
        if "val_bytes" in total:  # nats per token x tokens = nats; / ln 2 = bits
            metrics.val_bits_per_byte = total["val_loss_sum"] / math.log(2) / total["val_bytes"]
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


def _mfu(records: list[dict[str, Any]], seconds: float) -> float | None:
    """Model FLOP/s of all workers over the sum of their peaks; None when a peak is unknown."""
    peaks = [r.get("peak_flops_per_s", 0.0) for r in records]
    if not all(peaks):
        return None
    return sum(r["flops"] for r in records) / max(seconds, 1e-9) / sum(peaks)


def _worker_figures(record: dict[str, Any]) -> WorkerFigures:
    steps = max(record["steps"], 1)
    phases_s = {p: record[p] / steps for p in PHASES}
    busy_s = sum(phases_s[p] for p in BUSY_PHASES)
    figures = WorkerFigures(
        busy_s=busy_s,
        samples_per_s=record["samples"] / steps / max(busy_s, 1e-9),
        phases_s=phases_s,
    )
    if "tokens" in record:
        figures.tokens_per_s = record["tokens"] / steps / max(busy_s, 1e-9)
        if record.get("peak_flops_per_s"):
            figures.mfu = record["flops"] / steps / max(busy_s, 1e-9) / record["peak_flops_per_s"]
    return figures

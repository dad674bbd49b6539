"""Turn per-rank records into global figures: a step's or an epoch's numbers over all workers.

Workers report sums (loss sums, correct counts, sample counts) rather than means, so the global
figure is exact whatever the shard sizes: validation accuracy is the true accuracy over every
validation sample.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepMetrics:
    step: int
    epoch: int
    loss: float  # mean of the workers' mean losses over the logging interval
    lr: float
    samples_per_s: float  # global: all workers' samples / the interval's wall time
    per_rank: dict[int, dict[str, Any]] = field(repr=False)


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # None for regression
    train_s: float
    samples: int


class MetricsCollector:
    """Buffers records until every rank has reported a step/epoch, then yields the global one."""

    def __init__(self, world_size: int, task: str, epochs: list[EpochMetrics] | None = None):
        self.world_size = world_size
        self.task = task
        self._pending: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
        # Shared with the supervisor, so the history survives restarts of the worker group.
        self.epochs: list[EpochMetrics] = epochs if epochs is not None else []
        self.last_step: StepMetrics | None = None

    def add(self, record: dict[str, Any]) -> StepMetrics | EpochMetrics | None:
        kind = record["kind"]
        key = (kind, record["step"] if kind == "step" else record["epoch"])
        ranks = self._pending[key]
        ranks[record["rank"]] = record
        if len(ranks) < self.world_size:
            return None
        del self._pending[key]
        return self._step(ranks) if kind == "step" else self._epoch(ranks)

    def _step(self, ranks: dict[int, dict[str, Any]]) -> StepMetrics:
        records = list(ranks.values())
        interval_s = max(r["interval_s"] for r in records)
        metrics = StepMetrics(
            step=records[0]["step"],
            epoch=records[0]["epoch"],
            loss=sum(r["loss"] for r in records) / len(records),
            lr=records[0]["lr"],
            samples_per_s=sum(r["samples"] for r in records) / max(interval_s, 1e-9),
            per_rank=ranks,
        )
        self.last_step = metrics
        return metrics

    def _epoch(self, ranks: dict[int, dict[str, Any]]) -> EpochMetrics:
        records = list(ranks.values())
        total = {key: sum(r[key] for r in records) for key in records[0] if key != "kind"}
        metrics = EpochMetrics(
            epoch=records[0]["epoch"],
            step=records[0]["step"],
            train_loss=total["train_loss_sum"] / max(total["train_batches"], 1),
            val_loss=total["val_loss_sum"] / max(total["val_count"], 1),
            val_accuracy=(
                total["val_correct"] / max(total["val_count"], 1)
                if self.task == "classification"
                else None
            ),
            train_s=max(r["train_s"] for r in records),
            samples=total["samples"],
        )
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
            # Training samples over the time spent in training loops (evaluation excluded).
            "samples_per_s": sum(e.samples for e in self.epochs) / max(train_s, 1e-9),
        }
        if last.val_accuracy is not None:
            summary["val_accuracy"] = last.val_accuracy
            summary["best_val_accuracy"] = max(e.val_accuracy or 0.0 for e in self.epochs)
        return summary

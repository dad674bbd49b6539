"""The terminal: one live bar for the whole job on a TTY, one line per epoch otherwise."""

from __future__ import annotations

import sys
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distrain.metrics import EpochMetrics, StepMetrics


class ProgressView(Protocol):
    def start(self, total_steps: int, epochs: int) -> None: ...
    def step(self, metrics: StepMetrics) -> None: ...
    def epoch(self, metrics: EpochMetrics) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


def _epoch_line(metrics: EpochMetrics, epochs: int) -> str:
    line = (
        f"epoch {metrics.epoch + 1}/{epochs}  step {metrics.step}  "
        f"train_loss {metrics.train_loss:.4f}  val_loss {metrics.val_loss:.4f}"
    )
    if metrics.val_accuracy is not None:
        line += f"  val_accuracy {metrics.val_accuracy:.4f}"
    return line + f"  {metrics.samples / max(metrics.train_s, 1e-9):,.0f} samples/s"


class RichProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )

    def start(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs
        self.task = self.progress.add_task(
            "train", total=total_steps, epoch=1, epochs=epochs, loss="-", rate="-"
        )
        self.progress.start()

    def step(self, metrics: StepMetrics) -> None:
        self.progress.update(
            self.task,
            completed=metrics.step,
            epoch=metrics.epoch + 1,
            loss=f"{metrics.loss:.4f}",
            rate=f"{metrics.samples_per_s:,.0f}",
        )

    def epoch(self, metrics: EpochMetrics) -> None:
        self.progress.console.print(_epoch_line(metrics, self.epochs))

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def stop(self) -> None:
        self.progress.stop()


class PlainProgress:
    """For CI and log files: no control characters, one line per epoch."""

    def start(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs
        print(f"training: {epochs} epochs, {total_steps} steps", file=sys.stderr, flush=True)

    def step(self, metrics: StepMetrics) -> None:
        pass

    def epoch(self, metrics: EpochMetrics) -> None:
        print(_epoch_line(metrics, self.epochs), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        pass


class NoProgress(PlainProgress):
    def start(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs

    def epoch(self, metrics: EpochMetrics) -> None:
        pass


def make_progress(mode: str) -> ProgressView:
    """`logger.progress`: auto picks rich on a terminal and plain lines otherwise."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    return {"rich": RichProgress, "plain": PlainProgress, "none": NoProgress}[mode]()

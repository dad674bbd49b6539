"""TensorBoard event files in the run directory; written by the driver only."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from distrain.metrics import EpochMetrics, StepMetrics


class TensorBoardWriter:
    """Per-iteration scalars on the global-step axis, per-epoch scalars on the epoch axis."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        # purge_step: on resume, points logged at or after it by the interrupted run are dropped
        # when TensorBoard reads the directory, so the resumed run appends without duplicates.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_step(self, metrics: StepMetrics) -> None:
        self.writer.add_scalar("train/loss", metrics.loss, metrics.step)
        self.writer.add_scalar("train/lr", metrics.lr, metrics.step)
        self.writer.add_scalar("train/samples_per_s", metrics.samples_per_s, metrics.step)
        skipped = max(r.get("skipped_steps", 0) for r in metrics.per_rank.values())
        if skipped:
            self.writer.add_scalar("faults/skipped_steps", skipped, metrics.step)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        epoch = metrics.epoch + 1  # epochs are counted from 1 on the axis, like the progress bar
        self.writer.add_scalar("epoch/train_loss", metrics.train_loss, epoch)
        self.writer.add_scalar("epoch/val_loss", metrics.val_loss, epoch)
        if metrics.val_accuracy is not None:
            self.writer.add_scalar("epoch/val_accuracy", metrics.val_accuracy, epoch)
        self.writer.add_scalar("epoch/train_s", metrics.train_s, epoch)
        self.writer.flush()

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        self.writer.add_text(tag, text, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()

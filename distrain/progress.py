"""The terminal: live bars on a TTY, one line per epoch otherwise, and the final summary.

On a terminal (rich): a bar for the whole job (global step, ETA of the job) and one for the
current epoch (its iterations, ETA of the epoch), with the latest loss and samples/s; each
finished epoch prints a line above them. Not on a terminal (CI, log files): the same epoch lines,
plain, with the job's ETA, and no control characters.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from distrain.metrics import EpochMetrics, EvalMetrics, StepMetrics


class ProgressView(Protocol):
    def start(self, total_steps: int, epochs: int, steps_per_epoch: int) -> None: ...
    def step(self, metrics: StepMetrics) -> None: ...
    def epoch(self, metrics: EpochMetrics) -> None: ...
    def evaluation(self, metrics: EvalMetrics) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


def resolve_mode(mode: str) -> str:
    """`logger.progress`: auto picks rich on a terminal and plain lines otherwise."""
    if mode == "auto":
        return "rich" if sys.stderr.isatty() else "plain"
    return mode


def _epoch_line(metrics: EpochMetrics, epochs: int) -> str:
    line = (
        f"epoch {metrics.epoch + 1}/{epochs}  step {metrics.step}  "
        f"train_loss {metrics.train_loss:.4f}  val_loss {metrics.val_loss:.4f}"
    )
    if metrics.val_accuracy is not None:
        line += f"  val_accuracy {metrics.val_accuracy:.4f}"
    if metrics.val_top5_accuracy is not None:
        line += f"  val_top5 {metrics.val_top5_accuracy:.4f}"
    if metrics.tokens:  # a language model: perplexity, bits per byte, tokens/s, MFU
        line += f"  val_ppl {metrics.val_perplexity:.2f}"
        if metrics.val_bits_per_byte is not None:
            line += f"  val_bpb {metrics.val_bits_per_byte:.3f}"
        line += f"  {metrics.tokens_per_s:,.0f} tokens/s"
        if metrics.mfu is not None:
            line += f"  MFU {metrics.mfu:.1%}"
        return line + f"  train {_duration(metrics.train_s)}"
    return line + f"  {metrics.samples_per_s:,.0f} samples/s  train {_duration(metrics.train_s)}"


def _evaluation_line(metrics: EvalMetrics, epochs: int) -> str:
    """An evaluation inside an epoch (trainer.eval_every_n_steps)."""
    line = f"  eval at step {metrics.step} (epoch {metrics.epoch + 1}/{epochs})"
    line += f"  val_loss {metrics.val_loss:.4f}"
    if metrics.val_accuracy is not None:
        line += f"  val_accuracy {metrics.val_accuracy:.4f}"
    if metrics.val_top5_accuracy is not None:
        line += f"  val_top5 {metrics.val_top5_accuracy:.4f}"
    if metrics.val_perplexity is not None:
        line += f"  val_ppl {metrics.val_perplexity:.2f}"
    if metrics.val_bits_per_byte is not None:
        line += f"  val_bpb {metrics.val_bits_per_byte:.3f}"
    return line + f"  eval {_duration(metrics.eval_s)}"


def _duration(seconds: float) -> str:
    """An epoch's training time: a toy job's epochs take milliseconds, not "0.0 s"."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=32),
            TextColumn("{task.fields[count]:>12}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            refresh_per_second=4,
        )

    def start(self, total_steps: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs, self.total_steps, self.steps_per_epoch = epochs, total_steps, steps_per_epoch
        self.current_epoch = 0
        self.job = self.progress.add_task(
            "training", total=total_steps, count=f"epoch 1/{epochs}", stats=""
        )
        self.iterations: TaskID = self.progress.add_task(
            "epoch 1", total=self._epoch_steps(0), count=f"0/{self._epoch_steps(0)} it", stats=""
        )
        self.progress.start()

    def _epoch_steps(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _enter_epoch(self, epoch: int) -> None:
        if epoch != self.current_epoch:
            self.current_epoch = epoch
            total = self._epoch_steps(epoch)
            self.progress.reset(
                self.iterations,
                total=total,
                description=f"epoch {epoch + 1}",
                count=f"0/{total} it",
            )

    def step(self, metrics: StepMetrics) -> None:
        self._enter_epoch(metrics.epoch)
        in_epoch = metrics.step - metrics.epoch * self.steps_per_epoch
        stats = f"loss {metrics.loss:.4f}  {metrics.samples_per_s:,.0f} samples/s"
        if metrics.tokens_per_s is not None:
            stats = f"loss {metrics.loss:.4f}  {metrics.tokens_per_s:,.0f} tokens/s"
            stats += f"  MFU {metrics.mfu:.1%}" if metrics.mfu is not None else ""
        self.progress.update(
            self.job, completed=metrics.step, count=f"epoch {metrics.epoch + 1}/{self.epochs}"
        )
        self.progress.update(
            self.iterations,
            completed=in_epoch,
            count=f"{in_epoch}/{self._epoch_steps(metrics.epoch)} it",
            stats=stats,
        )

    def epoch(self, metrics: EpochMetrics) -> None:
        self.progress.update(self.job, completed=metrics.step)
        self.progress.update(self.iterations, completed=self._epoch_steps(metrics.epoch))
        self.progress.console.print(_epoch_line(metrics, self.epochs))
        if metrics.epoch + 1 < self.epochs:
            self._enter_epoch(metrics.epoch + 1)

    def evaluation(self, metrics: EvalMetrics) -> None:
        self.progress.console.print(_evaluation_line(metrics, self.epochs))

    def message(self, text: str) -> None:
        self.progress.console.print(f"[bold yellow]{text}[/]")

    def stop(self) -> None:
        self.progress.stop()


class PlainProgress:
    """For CI and log files: no control characters, one line per epoch with the job's ETA."""

    def start(self, total_steps: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs, self.total_steps = epochs, total_steps
        self.busy_s = 0.0  # training + evaluation so far; start-up does not count toward the ETA
        print(f"training: {epochs} epochs, {total_steps} steps", file=sys.stderr, flush=True)

    def step(self, metrics: StepMetrics) -> None:
        pass

    def epoch(self, metrics: EpochMetrics) -> None:
        self.busy_s += metrics.train_s + metrics.eval_s
        eta_s = self.busy_s / max(metrics.step, 1) * max(self.total_steps - metrics.step, 0)
        line = _epoch_line(metrics, self.epochs) + f"  eta {_clock(eta_s)}"
        print(line, file=sys.stderr, flush=True)

    def evaluation(self, metrics: EvalMetrics) -> None:
        self.busy_s += metrics.eval_s
        print(_evaluation_line(metrics, self.epochs), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        pass


class NoProgress(PlainProgress):
    def start(self, total_steps: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs

    def epoch(self, metrics: EpochMetrics) -> None:
        pass

    def evaluation(self, metrics: EvalMetrics) -> None:
        pass


def make_progress(mode: str) -> ProgressView:
    return {"rich": RichProgress, "plain": PlainProgress, "none": NoProgress}[resolve_mode(mode)]()


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The final summary as (label, value) rows, shared by the table and the plain text."""

    def final_best(key: str, best: str, fmt: str = ".4f") -> str:
        text = f"{metrics[key]:{fmt}}"
        return text + (f"  (best {metrics[best]:{fmt}})" if best in metrics else "")

    rows = [
        ("epochs", str(metrics.get("epochs", 0))),
        ("steps", str(metrics.get("steps", 0))),
        ("workers", f"{metrics.get('workers', '?')} ({metrics.get('device', '?')})"),
        ("wall time", f"{metrics['wall_s']:.1f} s"),
        ("samples/s", f"{metrics.get('samples_per_s', 0.0):,.0f}"),
    ]
    if "tokens_per_s" in metrics:
        rows.append(("tokens/s", f"{metrics['tokens_per_s']:,.0f}"))
        per_worker = ", ".join(f"{x:,.0f}" for x in metrics.get("worker_tokens_per_s") or [])
        rows.append(("tokens/s per worker", per_worker))
    if "mfu" in metrics:
        rows.append(("MFU", f"{metrics['mfu']:.1%}"))
    if "train_loss" in metrics:
        rows.append(("train loss", f"{metrics['train_loss']:.4f}"))
    if "val_loss" in metrics:
        rows.append(("val loss", final_best("val_loss", "best_val_loss")))
    if "val_perplexity" in metrics:
        rows.append(("val perplexity", f"{metrics['val_perplexity']:.3f}"))
    if "val_bits_per_byte" in metrics:
        rows.append(("val bits per byte", f"{metrics['val_bits_per_byte']:.4f}"))
    if "val_accuracy" in metrics:
        rows.append(("val accuracy (top-1)", final_best("val_accuracy", "best_val_accuracy")))
    if "val_top5_accuracy" in metrics:
        top5 = final_best("val_top5_accuracy", "best_val_top5_accuracy")
        rows.append(("val accuracy (top-5)", top5))
    for straggler in metrics.get("stragglers", []):
        starved = straggler.get("cause") == "cpu_contention"
        rows.append(
            (
                "straggler",
                f"rank {straggler['rank']} on {straggler['node_ip']}, "
                f"{straggler['ratio']:.2f}x at step {straggler['step']}"
                + (" (waiting for a CPU core)" if starved else ""),
            )
        )
    early = metrics.get("early_stopped")
    if early is not None:
        rows.append(("early stopped", f"at step {early['step']}: {early['reason']}"))
    best = metrics.get("checkpoints", {}).get("best")
    if best is not None:
        rows.append(
            (
                "best checkpoint",
                f"step {best['step']}, val loss {best['val_loss']:.4f} "
                f"(its weights: distrain export {metrics['run_dir']} --best)",
            )
        )
    rows.append(("run dir", metrics["run_dir"]))
    rows.append(("tensorboard", f"tensorboard --logdir {metrics['run_dir']}"))
    return rows


def print_summary(metrics: dict[str, Any], mode: str) -> None:
    """A rich table on a terminal, plain `label: value` lines otherwise (and for `none`)."""
    rows = summary_rows(metrics)
    if resolve_mode(mode) == "rich":
        table = Table(title="distrain: done", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, value in rows:
            table.add_row(label, value)
        Console(stderr=True).print(table)
        return
    lines = [f"distrain: done in {metrics['wall_s']:.1f} s"]
    lines += [f"  {label + ':':<22}{value}" for label, value in rows]
    print("\n".join(lines), file=sys.stderr, flush=True)

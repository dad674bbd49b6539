"""The supervisor's checkpoints: records become writes, writes become the point a restart uses.

Ranks send checkpoint records through the sink; once every share of a step has arrived it is
queued for the background writer (distrain/checkpoint_writer.py), except at an epoch's end,
where it waits until that epoch's figures are in the history it carries. The last checkpoint
written is where a restart resumes from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain import checkpoint
from distrain.checkpoint_writer import CheckpointWriter, Pending, write_failure
from distrain.config import TrainerConfig
from distrain.metrics import EpochMetrics
from distrain.records import CheckpointRecord
from distrain.val_losses import ValLossByStep
from distrain.watch import first_line

log = logging.getLogger("distrain")


@dataclass(frozen=True)
class BestCheckpoint:
    step: int
    val_loss: float
    path: Path


class Checkpoints:
    def __init__(
        self,
        directory: Path,
        trainer: TrainerConfig,
        resume_must_match: dict[str, Any],
        message: Callable[[str], None],
    ) -> None:
        """`resume_must_match`: the job's groups a resume checks; `message`: tells the user."""
        self.trainer, self.message = trainer, message
        self.store = checkpoint.CheckpointStore(directory, trainer.keep_checkpoints)
        self._writer = CheckpointWriter(
            self.store,
            job=resume_must_match,
            # Bounded: a share held on a node cut off from this one is not fetched until Ray
            # declares the node dead (minutes); the hang timeout applies to it as to a step.
            fetch_timeout_s=trainer.step_timeout_s,
        )
        # The checkpoint a restart resumes from: the last one written, or the one resumed from.
        self.last_path: Path | None = None
        self.last_step = 0
        self._epoch_end: Pending | None = None  # complete, waiting for its epoch's figures
        # The best checkpoint: of those written that were also evaluated (an epoch's end, or
        # trainer.eval_every_n_steps on a checkpoint step), the one of the lowest val loss. An
        # evaluation and its step's write finish in either order: each looks for the other.
        self.best: BestCheckpoint | None = None
        # The run's evaluations: the best is chosen by them, each checkpoint carries those up
        # to its step, and early stopping reads them.
        self.val_losses = ValLossByStep()
        self._written: set[int] = set()  # steps of the checkpoints this run wrote

    def resumed_from(self, resume: checkpoint.Checkpoint) -> None:
        """A resumed run: the restart point, the evaluations before it, and the best checkpoint
        as the run had it at that step (a best pointer to a later step, left by a resume from
        an earlier checkpoint, goes back to the best one before it)."""
        self.last_path, self.last_step = resume.path, resume.step
        self.val_losses.update(ValLossByStep.of_checkpoint(resume.meta))
        if not self.trainer.keep_best_checkpoint:
            return
        evaluated = sorted(
            (loss, step)
            for step, loss in self.val_losses.items()
            if step <= resume.step and math.isfinite(loss)
        )
        for loss, step in evaluated:  # the lowest on disk (the earliest of equal ones)
            path = self.store.mark_best(step)
            if path is not None:
                self.best = BestCheckpoint(step=step, val_loss=loss, path=path)
                return

    def restart_point(self) -> checkpoint.Checkpoint | None:
        """The last checkpoint written, loaded (None: none yet, restart from the start)."""
        return checkpoint.load(self.last_path) if self.last_path else None

    def latest(self) -> Path | None:
        return self.store.latest()

    def begin_group(self) -> None:
        """A new group is watched: an epoch's checkpoint the last one left unsaved is dropped."""
        self._epoch_end = None

    def add(
        self, record: CheckpointRecord, world_size: int, history: list[EpochMetrics], sink: Any
    ) -> None:
        """A rank's checkpoint record; a step whose every share arrived is saved (an epoch's
        last step once its figures are in the history: `epoch_recorded`)."""
        pending = self._writer.add(record, world_size)
        if pending is None:
            return
        if record.epoch_end:
            self._epoch_end = pending
        else:
            self._save(pending, history, sink)

    def epoch_recorded(self, history: list[EpochMetrics], sink: Any) -> None:
        """An epoch's figures are in `history`: its checkpoint goes (before TensorBoard shows
        the epoch, so a run that stops there resumes after it)."""
        if self._epoch_end is not None:
            self._save(self._epoch_end, history, sink)
            self._epoch_end = None

    def recorded(self, metrics: Any) -> None:
        """Figures the driver recorded: an evaluation's (an epoch's or one inside an epoch) is
        kept, and may make the checkpoint of its step the best."""
        if self.val_losses.add(metrics) and metrics.step in self._written:
            self._consider_best(metrics.step)

    def _consider_best(self, step: int) -> None:
        loss = self.val_losses[step]
        if not self.trainer.keep_best_checkpoint or not math.isfinite(loss):
            return
        if self.best is None or loss < self.best.val_loss:
            path = self.store.mark_best(step)
            if path is not None:  # None: rotated out before its evaluation arrived
                self.best = BestCheckpoint(step=step, val_loss=loss, path=path)

    def _save(self, pending: Pending, history: list[EpochMetrics], sink: Any) -> None:
        """Queue a checkpoint for the background writer; with trainer.async_checkpoint=false,
        wait until it is written and let the workers (waiting for it) go on."""
        history_json = [dataclasses.asdict(e) for e in history]
        self._writer.submit(pending, history_json, self.val_losses.up_to(pending.step))
        if not self.trainer.async_checkpoint:
            self.settle(wait=True)
            sink.saved.remote(pending.step)

    def settle(
        self, *, wait: bool, failed: bool = False, nodes: list[dict[str, Any]] | None = None
    ) -> None:
        """Take the results of the checkpoint writes done (with `wait`: of all queued ones).

        A share that could not be fetched fails the group as a hang would (naming unreachable
        `nodes`); once the group has `failed` anyway, a lost write only leaves the previous
        checkpoint as the latest.
        """
        results = self._writer.wait() if wait else self._writer.finished()
        for result in results:
            if result.saved is not None:
                log.debug("checkpoint %s written in %.3f s", result.saved.path, result.write_s)
                self.last_path, self.last_step = result.saved.path, result.step
                self._written.add(result.step)
                if result.step in self.val_losses:
                    self._consider_best(result.step)
        failed_writes = [r for r in results if r.error is not None]
        if not failed_writes:
            return
        if failed:
            lost = failed_writes[0]
            self.message(f"the checkpoint of step {lost.step} was lost: {first_line(lost.error)}")
            return
        raise write_failure(failed_writes[0], nodes or [], self.trainer.step_timeout_s)

    def assemble(self, records: list[CheckpointRecord], epoch_end: bool) -> dict[str, Any]:
        """A checkpoint's metadata from its ranks' records (a heal's survivors send theirs)."""
        return self._writer.assemble(records, epoch_end)

    def stats(self) -> dict[str, Any]:
        """The writes' counts and timings, and the best checkpoint, for metrics.json."""
        best = {}
        if self.best is not None:
            best = {"best": {**dataclasses.asdict(self.best), "path": str(self.best.path)}}
        return {**self._writer.stats(), **best}

    def after_failure(self) -> None:
        """A write in progress completes, or fails with the group (its shares' owners died);
        shares of checkpoints the failed group can no longer complete are dropped."""
        self.settle(wait=True, failed=True)
        self._writer.forget()
        self._epoch_end = None

"""Early stopping: end a run once its validation loss has stopped improving.

With `trainer.early_stopping_patience=N`, once N evaluations in a row (epoch ends, and
`trainer.eval_every_n_steps` evaluations) have not lowered the best validation loss, the
supervisor asks the workers to stop at their next checkpoint boundary, as Ctrl-C does; the run
then ends as complete (exit 0, model.pt and metrics.json written, `early_stopped` in it). The
driver learns of an evaluation after the workers have moved on, so the stop lands at the next
boundary: the next epoch's end, unless `trainer.checkpoint_every_n_steps` makes earlier ones.
The best model is the best checkpoint's (`checkpoints/best`, `distrain export RUN --best`).

The evaluations are the run's `ValLossByStep` (distrain/val_losses.py): a restart's repeated
ones count once, and a resumed run counts those before its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from distrain.val_losses import ValLossByStep


@dataclass
class EarlyStopping:
    patience: int | None  # trainer.early_stopping_patience (None: never stop early)
    val_losses: ValLossByStep  # the run's, shared with the best checkpoint's choice

    def reason(self) -> str | None:
        """Why the run should stop now (None: it goes on)."""
        losses = self.val_losses
        if self.patience is None or not losses:
            return None
        steps = sorted(losses)
        best_step = min(steps, key=lambda step: losses[step])  # the earliest lowest
        since = [step for step in steps if step > best_step][: self.patience]
        if len(since) < self.patience:
            return None
        return (
            f"no val loss below {losses[best_step]:.4f} (step {best_step}) in the "
            f"{self.patience} evaluations after it (steps {', '.join(map(str, since))}; "
            "trainer.early_stopping_patience)"
        )

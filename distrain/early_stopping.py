"""Early stopping: end a run once its validation loss has stopped improving.

With `trainer.early_stopping_patience=N`, once N evaluations in a row (epoch ends, and
`trainer.eval_every_n_steps` evaluations) have not lowered the best validation loss, the
supervisor asks the workers to stop at their next checkpoint boundary, as Ctrl-C does; the run
then ends as complete (exit 0, model.pt and metrics.json written, `early_stopped` in it). The
driver learns of an evaluation after the workers have moved on, so the stop lands at the next
boundary: the next epoch's end, unless `trainer.checkpoint_every_n_steps` makes earlier ones.
The best model is the best checkpoint's (`checkpoints/best`, `distrain export RUN --best`).

Evaluations are kept by step: those a restart from a checkpoint repeats replace the first ones,
and are not counted twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from distrain.metrics import EpochMetrics, EvalMetrics


@dataclass
class EarlyStopping:
    patience: int | None  # trainer.early_stopping_patience (None: never stop early)
    _val_loss_at: dict[int, float] = field(default_factory=dict)  # by step

    def recorded(self, metrics: Any) -> None:
        """Figures the driver recorded; an evaluation's val loss counts."""
        if isinstance(metrics, EpochMetrics | EvalMetrics):
            loss = metrics.val_loss
            self._val_loss_at[metrics.step] = loss if math.isfinite(loss) else math.inf

    def reason(self) -> str | None:
        """Why the run should stop now (None: it goes on)."""
        if self.patience is None or not self._val_loss_at:
            return None
        steps = sorted(self._val_loss_at)
        best_step = min(steps, key=lambda step: self._val_loss_at[step])  # the earliest lowest
        since = [step for step in steps if step > best_step][: self.patience]
        if len(since) < self.patience:
            return None
        return (
            f"no val loss below {self._val_loss_at[best_step]:.4f} (step {best_step}) in the "
            f"{self.patience} evaluations after it (steps {', '.join(map(str, since))}; "
            "trainer.early_stopping_patience)"
        )

"""The run's validation losses by step: what the best checkpoint and early stopping decide from.

Every evaluation counts (each epoch's end, and `trainer.eval_every_n_steps` inside epochs). The
ones a restart from a checkpoint repeats replace the first ones, so none counts twice. Each
checkpoint carries those up to its step (`up_to`), so a run resumed from it (`resume=RUN`, which
writes into the same directory) keeps its best checkpoint and its early-stopping count as an
uninterrupted run would (`of_checkpoint`).
"""

from __future__ import annotations

import math
from typing import Any

from distrain.metrics import EpochMetrics, EvalMetrics


class ValLossByStep(dict[int, float]):
    """step -> val loss; a loss that is not finite (NaN, inf) is kept as inf: never the best."""

    def add(self, metrics: Any) -> bool:
        """Keep `metrics`' val loss if it is an evaluation's; whether it was."""
        if not isinstance(metrics, EpochMetrics | EvalMetrics):
            return False
        loss = metrics.val_loss
        self[metrics.step] = loss if math.isfinite(loss) else math.inf
        return True

    def up_to(self, step: int) -> list[list[float | None]]:
        """The evaluations at or before `step`, as a checkpoint's JSON holds them: [step, loss]
        pairs, null for inf (JSON has no infinity)."""
        return [
            [s, loss if math.isfinite(loss) else None]
            for s, loss in sorted(self.items())
            if s <= step
        ]

    @classmethod
    def of_checkpoint(cls, meta: dict[str, Any]) -> ValLossByStep:
        """The evaluations a checkpoint carries; for one written before checkpoints carried
        them, its history's epoch ends."""
        if "val_losses" in meta:
            pairs = meta["val_losses"]
        else:
            pairs = [[epoch["step"], epoch["val_loss"]] for epoch in meta.get("history", [])]
        return cls({int(step): math.inf if loss is None else float(loss) for step, loss in pairs})

"""Early stopping's rule: `patience` evaluations after the best without a lower val loss, and
the evaluations a checkpoint carries to a resumed run."""

from __future__ import annotations

import json
import math

from distrain.early_stopping import EarlyStopping
from distrain.metrics import EpochMetrics, EvalMetrics
from distrain.val_losses import ValLossByStep


def _epoch(step: int, val_loss: float) -> EpochMetrics:
    return EpochMetrics(
        epoch=0, step=step, train_loss=1.0, val_loss=val_loss, val_accuracy=None, train_s=1.0,
        samples=1,
    )  # fmt: skip


def _eval(step: int, val_loss: float) -> EvalMetrics:
    return EvalMetrics(
        step=step, epoch=0, eval_s=0.1, val_loss=val_loss, val_accuracy=None,
        val_top5_accuracy=None, val_bits_per_byte=None,
    )  # fmt: skip


def test_stops_after_patience_evaluations_without_a_lower_loss() -> None:
    losses = ValLossByStep()
    rule = EarlyStopping(patience=2, val_losses=losses)
    for step, loss in [(10, 1.0), (20, 0.5), (30, 0.6)]:
        assert losses.add(_eval(step, loss))
        assert rule.reason() is None
    losses.add(_epoch(40, 0.5))  # equal is not better
    assert rule.reason() == (
        "no val loss below 0.5000 (step 20) in the 2 evaluations after it (steps 30, 40; "
        "trainer.early_stopping_patience)"
    )
    losses.add(_eval(50, 0.4))  # a new best: the count starts again
    assert rule.reason() is None


def test_repeated_evaluations_after_a_restart_count_once_and_nan_is_no_improvement() -> None:
    losses = ValLossByStep()
    rule = EarlyStopping(patience=2, val_losses=losses)
    for step, loss in [(10, 1.0), (20, 2.0), (20, 2.0), (10, 1.0)]:  # a restart from step 0
        losses.add(_eval(step, loss))
    assert rule.reason() is None
    losses.add(_eval(30, math.nan))
    assert "(steps 20, 30;" in rule.reason()


def test_no_patience_never_stops_and_other_figures_do_not_count() -> None:
    losses = ValLossByStep()
    never = EarlyStopping(patience=None, val_losses=losses)
    for step in range(1, 20):
        losses.add(_eval(step, float(step)))
    assert never.reason() is None
    losses = ValLossByStep()
    rule = EarlyStopping(patience=1, val_losses=losses)
    assert not losses.add(None)  # a heartbeat
    losses.add(_eval(1, 1.0))
    assert rule.reason() is None


def test_a_checkpoint_carries_the_evaluations_up_to_its_step_and_a_resume_counts_them() -> None:
    losses = ValLossByStep()
    for step, loss in [(10, 1.0), (20, 0.5), (30, math.inf), (40, 0.7)]:
        losses.add(_eval(step, loss))
    carried = losses.up_to(30)
    assert carried == [[10, 1.0], [20, 0.5], [30, None]]  # JSON has no infinity
    meta = json.loads(json.dumps({"val_losses": carried}, allow_nan=False))
    resumed = ValLossByStep.of_checkpoint(meta)
    assert resumed == {10: 1.0, 20: 0.5, 30: math.inf}
    rule = EarlyStopping(patience=2, val_losses=resumed)
    resumed.add(_eval(40, 0.7))  # the first evaluation after the resume: the second since 20
    assert "(step 20) in the 2 evaluations after it (steps 30, 40;" in rule.reason()


def test_a_checkpoint_from_before_evaluations_were_carried_counts_its_epochs() -> None:
    history = [{"step": 22, "val_loss": 0.4}, {"step": 44, "val_loss": 0.3}]
    assert ValLossByStep.of_checkpoint({"history": history}) == {22: 0.4, 44: 0.3}
    assert ValLossByStep.of_checkpoint({}) == {}

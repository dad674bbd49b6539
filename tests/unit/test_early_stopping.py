"""Early stopping's rule: `patience` evaluations after the best without a lower val loss."""

from __future__ import annotations

import math

from distrain.early_stopping import EarlyStopping
from distrain.metrics import EpochMetrics, EvalMetrics


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
    rule = EarlyStopping(patience=2)
    for step, loss in [(10, 1.0), (20, 0.5), (30, 0.6)]:
        rule.recorded(_eval(step, loss))
        assert rule.reason() is None
    rule.recorded(_epoch(40, 0.5))  # equal is not better
    assert rule.reason() == (
        "no val loss below 0.5000 (step 20) in the 2 evaluations after it (steps 30, 40; "
        "trainer.early_stopping_patience)"
    )
    rule.recorded(_eval(50, 0.4))  # a new best: the count starts again
    assert rule.reason() is None


def test_repeated_evaluations_after_a_restart_count_once_and_nan_is_no_improvement() -> None:
    rule = EarlyStopping(patience=2)
    for step, loss in [(10, 1.0), (20, 2.0), (20, 2.0), (10, 1.0)]:  # a restart from step 0
        rule.recorded(_eval(step, loss))
    assert rule.reason() is None
    rule.recorded(_eval(30, math.nan))
    assert "(steps 20, 30;" in rule.reason()


def test_no_patience_never_stops_and_other_figures_do_not_count() -> None:
    never = EarlyStopping(patience=None)
    for step in range(1, 20):
        never.recorded(_eval(step, float(step)))
    assert never.reason() is None
    rule = EarlyStopping(patience=1)
    rule.recorded(None)  # a heartbeat
    rule.recorded(_eval(1, 1.0))
    assert rule.reason() is None

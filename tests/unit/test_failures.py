"""The supervisor's failure account (distrain/failures.py): limits, avoided nodes, timings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from distrain.errors import GroupFailed, TrainingFailed
from distrain.failures import FailureLog
from distrain.records import EpochRecord, ValidationSums


def test_a_failure_past_the_limit_ends_the_run_naming_the_checkpoint_to_resume(tmp_path):
    log = FailureLog(max_failures=1)
    latest = tmp_path / "checkpoints" / "step-000000040"
    log.count(GroupFailed("rank 1 died"), here="n0", latest=latest, resume_dir=tmp_path)
    with pytest.raises(TrainingFailed) as raised:
        log.count(GroupFailed("rank 0 died"), here="n0", latest=latest, resume_dir=tmp_path)
    message = str(raised.value)
    assert "rank 0 died" in message and "trainer.max_failures=1" in message
    assert str(latest) in message and f"resume={tmp_path}" in message
    assert len(log) == 2


def test_without_a_checkpoint_the_limit_says_none_was_written(tmp_path):
    log = FailureLog(max_failures=0)
    with pytest.raises(TrainingFailed, match=r"no checkpoint was written\.$"):
        log.count(GroupFailed("lost"), here="n0", latest=None, resume_dir=Path("/r"))


def test_unreachable_nodes_are_avoided_except_the_drivers_own():
    log = FailureLog(max_failures=3)
    cut = GroupFailed("cut", unreachable_nodes=frozenset({"n0", "n1"}))
    log.count(cut, here="n0", latest=None, resume_dir=Path("/r"))
    assert log.excluded_nodes == {"n1"}
    log.count(GroupFailed("cut", frozenset({"n2"})), here="n0", latest=None, resume_dir=Path("/r"))
    assert log.excluded_nodes == {"n1", "n2"}


def test_timings_run_from_the_last_progress_through_recovery_to_the_next_progress():
    log = FailureLog(max_failures=3)
    log.progressed(time.monotonic())
    before = log.last_progress_s
    log.count(GroupFailed("died"), here="n0", latest=None, resume_dir=Path("/r"))
    log.recovered({"from_step": 12})
    log.recovered({"from_step": 99})  # a later group (grow-back) is not this failure's recovery
    after = time.monotonic()
    log.progressed(after)
    entry = log.to_json()[0]
    assert entry["healed"] == {"from_step": 12}
    assert 0 <= entry["detection_s"] <= entry["downtime_s"]
    assert entry["downtime_s"] == pytest.approx(after - before)
    assert entry["recovery_s"] <= entry["downtime_s"]
    assert set(entry) == {"error", "detection_s", "recovery_s", "downtime_s", "healed"}
    log.progressed(after + 5.0)  # later progress leaves a closed failure alone
    assert log.to_json()[0]["downtime_s"] == pytest.approx(after - before)


def test_a_failure_with_no_progress_after_it_reports_no_clock_readings():
    """metrics.json gets durations only: a failure the run never got past has just its error."""
    log = FailureLog(max_failures=3)
    log.count(GroupFailed("rank 1 died"), here="n0", latest=None, resume_dir=Path("/r"))
    assert log.to_json() == [{"error": "rank 1 died"}]
    log.recovered()
    assert set(log.to_json()[0]) == {"error", "recovery_s"}


def test_a_failure_noticed_before_it_was_raised_counts_from_when_it_was_noticed():
    """A hang is noticed when the silence passes the timeout; dumping the stacks after that (up
    to 10 s from a cut-off node) is recovery time, not detection time."""
    log = FailureLog(max_failures=3)
    log.progressed(time.monotonic())
    noticed = time.monotonic()
    time.sleep(0.05)
    failure = GroupFailed("rank 1 silent", noticed_s=noticed)
    log.count(failure, here="n0", latest=None, resume_dir=Path("/r"))
    log.recovered()
    log.progressed(time.monotonic())
    entry = log.to_json()[0]
    assert entry["detection_s"] < 0.05 <= entry["recovery_s"]


def _epoch_record(rank: int, epoch: int) -> EpochRecord:
    return EpochRecord(
        rank=rank,
        epoch=epoch,
        step=22 * (epoch + 1),
        train_loss_sum=2.0 * (rank + 1),
        train_batches=2,
        samples=64,
        train_s=1.0,
        eval_s=0.0,
        validation=ValidationSums(loss_sum=3.0, correct=6, count=10),
    )


def test_an_epoch_a_dead_rank_never_reported_is_completed_from_the_others():
    """Rank 1 dies after epoch 0's last step but before sending its record: the survivors go on
    from that step (healed), so only the others' figures can complete the epoch."""
    from distrain.metrics import MetricsCollector

    collector = MetricsCollector(3, "classification")
    assert collector.add(_epoch_record(0, 0)) is None
    assert collector.add(_epoch_record(2, 0)) is None
    assert collector.add(_epoch_record(0, 1)) is None  # epoch 1: rank 2 has not reported yet
    assert collector.complete_without(frozenset({0})) == []  # rank 0 reported: not its loss
    [epoch] = collector.complete_without(frozenset({1}))
    assert (epoch.epoch, epoch.missing_ranks) == (0, [1])
    assert epoch.val_loss == pytest.approx(6.0 / 20) and epoch.val_accuracy == pytest.approx(0.6)
    assert epoch.train_loss == pytest.approx((2.0 + 6.0) / 4) and collector.epochs == [epoch]
    # Epoch 1 still waits for rank 2, which is alive and will send it.
    assert collector.add(_epoch_record(1, 1)) is None
    assert collector.add(_epoch_record(2, 1)).missing_ranks is None


def test_an_evaluation_a_dead_rank_never_reported_is_completed_from_the_others():
    """The same for an evaluation inside an epoch (trainer.eval_every_n_steps)."""
    from distrain.metrics import EvalMetrics, MetricsCollector
    from distrain.records import EvalRecord

    def evaluated(rank: int, step: int) -> EvalRecord:
        sums = ValidationSums(loss_sum=2.0 * (rank + 1), correct=5, count=10)
        return EvalRecord(step=step, epoch=0, eval_s=0.1, validation=sums, rank=rank)

    collector = MetricsCollector(2, "classification")
    assert collector.add(evaluated(0, 10)) is None
    assert collector.add(evaluated(0, 20)) is None
    ten, twenty = collector.complete_without(frozenset({1}))
    assert isinstance(ten, EvalMetrics) and collector.epochs == []
    assert [(e.step, e.missing_ranks) for e in (ten, twenty)] == [(10, [1]), (20, [1])]
    assert ten.val_loss == pytest.approx(0.2) and ten.val_accuracy == 0.5  # rank 0's shard
    assert collector.complete_without(frozenset({1})) == []  # each is completed once
    assert collector.add(evaluated(1, 30)) is None  # a later step waits for rank 0 as usual

"""The monitoring pieces on their own: straggler detection, step timing, HParams values, the
summary, and DDP's communication wait measured on a real gloo group."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from distrain.aggregators.allreduce import AllReduce
from distrain.config import typed
from distrain.metrics import EpochMetrics, EvalMetrics, MetricsCollector, StepMetrics
from distrain.progress import PlainProgress, print_summary
from distrain.records import EvalRecord, StepRecord, ValidationSums
from distrain.stragglers import StragglerDetector
from distrain.tensorboard_writer import hparams_of
from distrain.timing import PHASES, RunQueueWait, StepClock
from tests.conftest import compose_job


def step_record(
    rank: int, step: int, busy_s: float, wait_s: float = 0.0, cpu_wait_s: float | None = None
) -> StepRecord:
    """A worker's record of a 10-step interval with `busy_s` of compute per step, `cpu_wait_s`
    of it waiting for a core."""
    steps = 10
    return StepRecord(
        rank=rank,
        step=step,
        epoch=0,
        loss=1.0,
        lr=0.1,
        grad_norm=2.0,
        samples=32 * steps,
        steps=steps,
        interval_s=(busy_s + wait_s) * steps,
        skipped_steps=0,
        phases_s={
            "data_s": 0.1 * busy_s * steps,
            "forward_backward_s": 0.8 * busy_s * steps,
            "aggregation_wait_s": wait_s * steps,
            "optimizer_s": 0.1 * busy_s * steps,
        },
        cpu_wait_s=None if cpu_wait_s is None else cpu_wait_s * steps,
    )


def interval(
    step: int, busy_by_rank: dict[int, float], cpu_wait_by_rank: dict[int, float] | None = None
) -> StepMetrics:
    collector = MetricsCollector(len(busy_by_rank), "classification")
    slowest = max(busy_by_rank.values())
    out = None
    for rank, busy_s in busy_by_rank.items():
        cpu_wait_s = None if cpu_wait_by_rank is None else cpu_wait_by_rank[rank]
        out = collector.add(step_record(rank, step, busy_s, slowest - busy_s, cpu_wait_s))
    assert isinstance(out, StepMetrics)
    return out


def test_collector_splits_each_workers_time() -> None:
    metrics = interval(10, {0: 0.010, 1: 0.030})
    assert metrics.workers[1].busy_s == pytest.approx(0.030)
    assert metrics.workers[0].phases_s["aggregation_wait_s"] == pytest.approx(0.020)
    assert metrics.workers[0].samples_per_s == pytest.approx(32 / 0.010)
    assert metrics.slowest_to_fastest == pytest.approx(3.0)
    assert metrics.step_s == pytest.approx(0.030)  # wall time per step: everyone waits
    assert metrics.samples_per_s == pytest.approx(64 / 0.030)
    assert set(metrics.phases_s) == set(PHASES)


def test_straggler_needs_patience_and_is_reported_once() -> None:
    detector = StragglerDetector(["10.0.0.1", "10.0.0.2", "10.0.0.3"], threshold=1.3, patience=3)
    slow = {0: 0.010, 1: 0.011, 2: 0.020}
    found = [detector.update(interval(10 * i, slow)) for i in range(1, 6)]
    assert found[0] is None and found[1] is None  # two intervals are not "a while"
    straggler = found[2]
    assert straggler is not None and straggler.rank == 2 and straggler.node_ip == "10.0.0.3"
    assert straggler.ratio == pytest.approx(0.020 / 0.0105)  # against the others' median
    assert straggler.step == 30
    assert "rank 2 on node 10.0.0.3" in straggler.message and "1.90x" in straggler.message
    assert found[3] is None and found[4] is None  # still slow: not repeated
    assert detector.flagged == 2
    # It recovers for `patience` intervals, then falls behind again: a new report.
    even = {0: 0.010, 1: 0.010, 2: 0.010}
    for i in range(3):
        assert detector.flagged == 2
        detector.update(interval(60 + 10 * i, even))
    assert detector.flagged is None
    again = [detector.update(interval(90 + 10 * i, slow)) for i in range(3)]
    assert again[2] is not None and len(detector.reports) == 2


def test_a_noisy_worker_is_not_reported_again_and_again() -> None:
    detector = StragglerDetector(["a", "b"], threshold=1.3, patience=2)
    slow, even = {0: 0.010, 1: 0.020}, {0: 0.010, 1: 0.010}
    pattern = [slow, slow] + [even, slow, slow] * 5  # one good interval between bad stretches
    found = [detector.update(interval(i + 1, busy)) for i, busy in enumerate(pattern)]
    assert sum(f is not None for f in found) == 1


def test_no_straggler_below_threshold_or_for_blips() -> None:
    detector = StragglerDetector(["a", "b"], threshold=1.3, patience=2)
    pattern = [{0: 0.010, 1: 0.012}, {0: 0.010, 1: 0.020}, {0: 0.010, 1: 0.010}] * 4
    assert all(detector.update(interval(i + 1, busy)) is None for i, busy in enumerate(pattern))
    single = StragglerDetector(["a"], threshold=1.3, patience=1)
    assert single.update(interval(1, {0: 1.0})) is None  # one worker has nobody to lag behind


def test_scheduling_noise_on_tiny_steps_is_not_a_straggler() -> None:
    """The default job on two shared cores: 1 ms steps, one worker preempted for ~5 ms per
    interval (1.5x) three intervals running. That is noise, not a straggler; the same ratio on
    steps that cost real time is one."""
    detector = StragglerDetector(["a", "b"], threshold=1.3, patience=3)
    noisy = {0: 0.0010, 1: 0.0015}  # 0.5 ms x 10 steps = 5 ms beyond the other per interval
    assert all(detector.update(interval(10 * (i + 1), noisy)) is None for i in range(3))
    slow = StragglerDetector(["a", "b"], threshold=1.3, patience=3)
    real = {0: 0.010, 1: 0.015}  # 50 ms per interval: 0.15 s over the three
    found = [slow.update(interval(10 * (i + 1), real)) for i in range(3)]
    assert found[2] is not None and found[2].rank == 1


def test_a_worker_starved_of_cpu_is_told_from_a_slow_one() -> None:
    """Both are reported (either holds the others back); the report says which it is: the
    extra compute spent waiting for a core (a crowded node), or doing the work (a slow device)."""
    busy = {0: 0.010, 1: 0.010, 2: 0.030}
    starved = {0: 0.001, 1: 0.001, 2: 0.015}  # 14 ms more waiting of its 20 ms more compute
    slow = {0: 0.001, 1: 0.001, 2: 0.005}  # 4 ms of 20 ms: the work itself is slower
    for waits, cause in ((starved, "cpu_contention"), (slow, "compute"), (None, "compute")):
        detector = StragglerDetector(["a", "b", "c"], threshold=1.3, patience=2)
        found = [detector.update(interval(10 * i, busy, waits)) for i in (1, 2)]
        report = found[1]
        assert report is not None and report.rank == 2 and report.cause == cause, (cause, report)
        assert report.as_dict()["cause"] == cause
        if cause == "cpu_contention":
            assert report.cpu_wait_s == pytest.approx(0.015)
            assert report.others_cpu_wait_s == pytest.approx(0.001)
            expected = "30.0 ms vs 10.0 ms of compute per step; 15.0 ms of it waiting for a CPU"
            assert expected in report.message
        else:
            assert "waiting" not in report.message


@pytest.mark.parametrize("measured", [True, False])
def test_the_per_worker_charts_show_the_cpu_wait_only_where_measured(
    tmp_path: Path, measured: bool
) -> None:
    """CPU workers report their wait for a core; GPU workers do not (no empty chart there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from distrain.tensorboard_writer import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path)
    waits = {0: 0.001, 1: 0.002} if measured else None
    writer.log_step(interval(10, {0: 0.010, 1: 0.012}, waits))
    writer.writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    titles = [chart.title for category in layout.category for chart in category.chart]
    assert titles[:3] == ["step_s", "samples_per_s", "data_s"]
    assert ("cpu_wait_s" in titles) is measured
    assert ("workers/rank1/cpu_wait_s" in events.Tags()["scalars"]) is measured


def _spin(cpu_s: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_s:
        pass


@pytest.mark.skipif(RunQueueWait.of_this_thread() is None, reason="Linux's schedstat only")
def test_step_clock_counts_the_wait_for_a_core_and_only_that() -> None:
    """Real competitors for the test's core (two spinning processes pinned to the same CPU):
    the time the training thread was ready but not running is counted in busy phases; sleeping
    is not waiting for a core, and a wait shifted out of compute takes its share with it."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only (pid 0: the calling thread)
        time.sleep(0.2)  # the competitor is spinning on the same core
        clock = StepClock()
        started_s, cpu_started_s = time.perf_counter(), time.thread_time()
        _spin(0.1)
        clock.lap("forward_backward_s")
        off_cpu_s = (time.perf_counter() - started_s) - (time.thread_time() - cpu_started_s)
        time.sleep(0.1)  # blocked, not runnable: no wait for a core
        clock.lap("data_s")
        _spin(0.02)
        clock.lap("aggregation_wait_s")  # waiting for the others is not busy time
    finally:
        os.sched_setaffinity(0, before)
        for hog in hogs:
            hog.kill()
            hog.wait()
    totals, cpu_wait_s = clock.pop(), clock.pop_cpu_wait()
    assert cpu_wait_s is not None and clock.pop_cpu_wait() == 0.0  # popped: a new interval
    # Sharing one core three ways, the 0.1 s of computing took about three times as long; all
    # of the difference (not the 0.1 s on the core) was spent waiting for it: nothing blocks.
    assert off_cpu_s > 0.15, off_cpu_s
    assert cpu_wait_s == pytest.approx(off_cpu_s, rel=0.25, abs=0.01), (cpu_wait_s, off_cpu_s)
    assert totals["data_s"] >= 0.1
    shifted = StepClock()
    shifted._cpu_wait_s = 0.03  # as if the last lap of compute had waited 30 ms for a core
    shifted.totals["forward_backward_s"] = 0.05
    shifted.shift("forward_backward_s", "aggregation_wait_s", 0.02, cpu_wait_s=0.01)
    assert shifted.pop_cpu_wait() == pytest.approx(0.02)


@pytest.mark.skipif(RunQueueWait.of_this_thread() is None, reason="Linux's schedstat only")
def test_a_run_queue_reader_outlives_its_thread() -> None:
    """DDP's hook thread can end before the step clock reads it again: no error, no new wait."""
    import threading

    readers: list[tuple[RunQueueWait | None, float]] = []

    def hook_thread() -> None:
        reader = RunQueueWait.of_this_thread()
        readers.append((reader, reader.read_s() if reader else -1.0))

    thread = threading.Thread(target=hook_thread)
    thread.start()
    thread.join()  # its Python code is done; the OS thread ends a moment later
    deadline = time.monotonic() + 10
    while Path(f"/proc/self/task/{thread.native_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(f"/proc/self/task/{thread.native_id}").exists()
    reader, read_in_thread_s = readers[0]
    assert reader is not None
    # Its last moments (after the read above) may have waited for a core too; then nothing more.
    assert reader.read_s() == reader.read_s() >= read_in_thread_s >= 0.0


def test_step_clock_shifts_waiting_out_of_compute() -> None:
    clock = StepClock()
    time.sleep(0.02)
    clock.lap("forward_backward_s")
    clock.shift("forward_backward_s", "aggregation_wait_s", 0.015)
    clock.shift("forward_backward_s", "aggregation_wait_s", 10.0)  # never more than was counted
    totals = clock.pop()
    assert totals["forward_backward_s"] == 0.0
    assert totals["aggregation_wait_s"] >= 0.02
    assert clock.pop() == dict.fromkeys(PHASES, 0.0)


def test_hparams_hold_overrides_and_key_values() -> None:
    overrides = ["optimizer=adam", "optimizer.lr=0.003", "model.hidden_sizes=[32,16]"]
    job = compose_job(*overrides)
    values = hparams_of(typed(job), [*overrides, "cluster.address=127.0.0.1:6379"])
    assert values["optimizer"] == "Adam"
    assert values["optimizer.lr"] == pytest.approx(0.003)
    assert values["model.hidden_sizes"] == "[32, 16]"  # lists become text
    assert values["trainer.workers"] == 2 and values["data"] == "digits"
    assert "cluster.address" not in values  # where it ran is not a hyperparameter
    assert "trainer.max_grad_norm" not in values  # unset: no column
    clipped = compose_job("experiment=gpt2_small", "data.path=/data/owt")
    assert hparams_of(typed(clipped), [])["trainer.max_grad_norm"] == 1.0  # set by an experiment


def test_plain_summary_names_results_and_the_tensorboard_command(capsys) -> None:
    metrics = {
        "epochs": 3,
        "steps": 66,
        "workers": 2,
        "device": "cpu",
        "wall_s": 12.5,
        "samples_per_s": 9000.0,
        "train_loss": 0.2,
        "val_loss": 0.3,
        "best_val_loss": 0.25,
        "val_accuracy": 0.9,
        "best_val_accuracy": 0.95,
        "stragglers": [
            {"rank": 1, "node_ip": "10.0.0.2", "ratio": 2.5, "step": 30, "cause": "compute"},
            {"rank": 0, "node_ip": "10.0.0.1", "ratio": 1.4, "step": 90, "cause": "cpu_contention"},
        ],
        "run_dir": "/runs/a",
    }
    print_summary(metrics, "plain")
    err = capsys.readouterr().err
    assert "val accuracy (top-1): 0.9000  (best 0.9500)" in err
    assert "rank 1 on 10.0.0.2, 2.50x at step 30\n" in err
    assert "rank 0 on 10.0.0.1, 1.40x at step 90 (waiting for a CPU core)" in err
    assert "tensorboard --logdir /runs/a" in err
    assert "\x1b[" not in err  # no control characters off a terminal


@pytest.mark.parametrize(("train_s", "shown"), [(0.031, "train 31 ms"), (12.34, "train 12.3 s")])
def test_plain_epoch_line_gives_the_epoch_time_in_a_readable_unit(
    train_s: float, shown: str, capsys
) -> None:
    progress = PlainProgress()
    progress.start(total_steps=44, epochs=2, steps_per_epoch=22)
    epoch = EpochMetrics(
        epoch=0,
        step=22,
        train_loss=1.0,
        val_loss=0.5,
        val_accuracy=0.9,
        train_s=train_s,
        samples=1408,
    )
    progress.epoch(epoch)
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("epoch 1/2  step 22  train_loss 1.0000  val_loss 0.5000")
    assert f"samples/s  {shown}  eta " in line


def _eval_record(rank: int, loss_sum: float, count: int, nbytes: float | None) -> EvalRecord:
    sums = ValidationSums(loss_sum=loss_sum, correct=0, count=count, bytes=nbytes)
    return EvalRecord(step=100, epoch=0, eval_s=0.5 + rank, validation=sums, rank=rank)


def test_an_evaluation_inside_an_epoch_adds_every_shard_then_divides() -> None:
    """Uneven token shards (3,000 and 1,000 tokens): the figure over all 4,000, not a mean of
    the two shards' means; complete only once both ranks reported the step."""
    collector = MetricsCollector(2, "language_model")
    assert collector.add(_eval_record(0, loss_sum=6000.0, count=3000, nbytes=3000.0)) is None
    figures = collector.add(_eval_record(1, loss_sum=1000.0, count=1000, nbytes=1000.0))
    assert isinstance(figures, EvalMetrics)
    assert (figures.step, figures.epoch, figures.eval_s) == (100, 0, 1.5)
    assert figures.val_loss == pytest.approx(7000.0 / 4000)  # (2.0 and 1.0 per token: not 1.5)
    assert figures.val_perplexity == pytest.approx(math.exp(1.75))
    assert figures.val_bits_per_byte == pytest.approx(7000.0 / math.log(2) / 4000)
    assert figures.val_accuracy is None  # not a classification
    assert collector.epochs == []  # an evaluation inside an epoch is not an epoch


def test_plain_evaluation_line_names_the_step_and_the_figures(capsys) -> None:
    progress = PlainProgress()
    progress.start(total_steps=44, epochs=2, steps_per_epoch=22)
    progress.evaluation(
        EvalMetrics(
            step=8,
            epoch=0,
            val_loss=0.5,
            val_accuracy=0.875,
            val_top5_accuracy=None,
            val_bits_per_byte=None,
            eval_s=0.004,
        )
    )
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == "  eval at step 8 (epoch 1/2)  val_loss 0.5000  val_accuracy 0.8750  eval 4 ms"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_rank(rank: int, port: int, out_dir: str, delay_s: float) -> None:
    """One rank of a real 2-process gloo group; rank 1 computes `delay_s` slower each step."""
    torch.manual_seed(0)
    aggregator = AllReduce()
    aggregator.connect(
        rank=rank,
        world_size=2,
        device=torch.device("cpu"),
        rendezvous={"master_addr": "127.0.0.1", "master_port": port},
        timeout_s=60,
    )
    model = aggregator.wrap(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)))
    waits = []
    for _ in range(5):
        loss = model(torch.randn(8, 16)).square().mean()
        if rank == 1:
            time.sleep(delay_s)  # slow compute before this rank's gradients exist
        loss.backward()
        waits.append(aggregator.backward_wait_s())
    aggregator.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(waits))


@pytest.mark.slow
def test_ddp_wait_is_the_time_blocked_behind_a_slow_rank(tmp_path: Path) -> None:
    delay_s = 0.2
    mp.spawn(_ddp_rank, args=(_free_port(), str(tmp_path), delay_s), nprocs=2, join=True)
    fast = json.loads((tmp_path / "rank0.json").read_text())
    slow = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 0 finished its backward and waited for rank 1's gradients at every step; rank 1 did
    # not wait. Medians: on a loaded 2-core machine a process can lose the CPU for 100 ms at any
    # point, which shortens or lengthens one step's wait.
    assert statistics.median(fast) >= 0.5 * delay_s, fast
    assert statistics.median(slow) < 0.25 * delay_s, slow

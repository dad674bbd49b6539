"""Never lose work: real Ray, real actors and processes killed, frozen and interrupted.

Each scenario compares the final parameters with one uninterrupted run of the same job. Those
whose fault strikes the workers (killed, frozen, killed mid-write or mid-heal) run the job in this
process, on the workers the last scenario kept, while a second thread strikes; those whose fault
strikes the driver (Ctrl-C) or a node run the real CLI in a process of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from distrain import checkpoint, driver, warm_workers
from distrain.checkpoint import CheckpointStore
from distrain.errors import TrainingFailed
from distrain.progress import PlainProgress
from distrain.rundir import RunDirectory
from tests.conftest import DISTRAIN, compose_job, free_kept_workers_before, run_cli, slowed

# 12 epochs x 22 steps: long enough to be interrupted, short enough for a test.
EPOCHS = 12
STEPS_PER_EPOCH = 1437 // 64
STEPS = EPOCHS * STEPS_PER_EPOCH
JOB = [
    f"trainer.epochs={EPOCHS}",
    "trainer.checkpoint_every_n_steps=10",
    "model.hidden_sizes=[64,64]",
    "optimizer.lr=0.05",
    "logger.progress=plain",
]
# The recovery scenarios add dropout: their result then depends on each rank's RNG stream, so
# equal final parameters show the RNG state was restored, not only the weights.
DROPOUT = "model.dropout=0.2"
RESUMED_FROM = re.compile(
    r"restart 1/\d+: .*?; resuming from the checkpoint of step (\d+)", re.DOTALL
)

pytestmark = pytest.mark.slow


# A wider MLP, so that writing a checkpoint (2 shards of ~17 MB) takes long enough to be hit.
WIDE = ["trainer.epochs=2", "model.hidden_sizes=[2048,2048]", "trainer.checkpoint_every_n_steps=4"]


@pytest.fixture(scope="module")
def references(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted runs the scenarios must equal, on 2 workers, one after another in this
    process on the same (kept) workers, which the first scenario run in this process takes:
    - "plain": JOB;
    - "dropout": the recovery scenarios' job, JOB with dropout;
    - "synchronous": the background-write scenario's job, WIDE, with synchronous checkpoints
      (its metrics too)."""
    runs = {
        "plain": [],
        "dropout": [DROPOUT],
        "synchronous": [*WIDE, "trainer.async_checkpoint=false"],
    }
    results: dict[str, Any] = {}
    for name, overrides in runs.items():
        run_dir = RunDirectory(tmp_path_factory.mktemp(f"reference-{name}"))
        job = compose_job(*JOB, *overrides, "trainer.workers=2", "logger.progress=none")
        metrics = driver.train(job, run_dir, keep_workers=True)
        results[name] = torch.load(run_dir.model_path, weights_only=True)
        results[f"{name}_metrics"] = metrics
    assert results["plain_metrics"]["steps"] == results["dropout_metrics"]["steps"] == STEPS
    return results


@pytest.fixture(scope="module")
def reference(references: dict[str, Any]) -> dict:
    """JOB, uninterrupted, on 2 workers: its final parameters."""
    return references["plain"]


@pytest.fixture(scope="module")
def reference_dropout(references: dict[str, Any]) -> dict:
    """The recovery scenarios' job (with dropout), uninterrupted, on 2 workers."""
    return references["dropout"]


@pytest.fixture
def scenario(
    ray_address: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> Scenario:
    """A scenario run in this process, in tmp_path/run (see Scenario)."""
    return Scenario(tmp_path / "run", monkeypatch, capfd)


def assert_resumed_from_a_checkpoint(stderr: str) -> None:
    """The restart continued from a checkpoint taken mid-run, not from step 0 (a deterministic
    job restarted from scratch would end with the same parameters too)."""
    match = RESUMED_FROM.search(stderr)
    assert match is not None, stderr[-3000:]
    step = int(match.group(1))
    # trainer.checkpoint_every_n_steps=10, and every epoch end (22 steps)
    assert 0 < step < STEPS and (step % 10 == 0 or step % STEPS_PER_EPOCH == 0), step


# Rank 0 sleeps 10 ms a step in the runs a test interrupts (the result does not change): the
# driver sees a checkpoint a few hundred ms after the workers pass it, and on a fast machine a
# run used to reach its end before the kill or Ctrl-C that the test sends after that checkpoint.
def start(
    ray_address: str, run_dir: Path, *overrides: str, step_delay_s: float = 0.01
) -> subprocess.Popen:
    command = [*DISTRAIN, *JOB, f"cluster.address={ray_address}", f"hydra.run.dir={run_dir}"]
    free_kept_workers_before([*command, *overrides])
    return subprocess.Popen(
        [*command, *overrides],
        cwd=run_dir.parent,
        stderr=subprocess.PIPE,
        text=True,
        env=slowed(0, step_delay_s),
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def first_checkpoint(run_dir: Path) -> Callable[[], bool]:
    return lambda: (run_dir / "checkpoints" / "latest").exists()


def worker(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "workers.json").read_text())["workers"][rank]


def finish(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout_s)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


class Scenario:
    """A job trained in this process (on the workers the last job kept) while `strike` runs on a
    second thread: it waits for a moment of the run (`wait`, `step_logged`), may hold the run
    still (`paused`), and breaks something. `run` returns the job's metrics and what it printed,
    or raises what the job raised."""

    def __init__(
        self, run_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
    ) -> None:
        self.run_dir, self._capfd = run_dir, capfd
        self._monkeypatch = monkeypatch
        self._ended = threading.Event()
        self._errors: list[BaseException] = []
        self.step_logged = 0  # the last step the driver logged (every log_every_n_steps)

    def wait(self, condition: Callable[[], bool], timeout_s: float = 120) -> None:
        """Until `condition` holds; the run must still be going."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert not self._ended.is_set(), "the run ended first"
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.05)

    @contextlib.contextmanager
    def paused(self, pid: int) -> Iterator[None]:
        """The run held still: `pid` (a worker) stopped, the others wait for it in the next
        collective; far within trainer.step_timeout_s, so nothing is declared hung."""
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed while stopped
                os.kill(pid, signal.SIGCONT)

    def run(
        self, strike: Callable[[Scenario], None], *overrides: str, step_delay_s: float = 0.01
    ) -> tuple[dict, str]:
        # Rank 0 sleeps a little each step (the result does not change): see `start`.
        self._monkeypatch.setenv("DISTRAIN_SLOW_RANK", f"0:{step_delay_s}")
        self._capfd.readouterr()  # what earlier runs printed is not this one's

        def striking() -> None:
            try:
                strike(self)
            except BaseException as error:  # re-raised on the test's thread
                self._errors.append(error)

        def logged(progress: PlainProgress, metrics: Any) -> None:
            self.step_logged = metrics.step

        # What the job prints per logged step (nothing, in plain mode) also tells the strike.
        self._monkeypatch.setattr(PlainProgress, "step", logged)
        thread = threading.Thread(target=striking, name="strike", daemon=True)
        thread.start()
        job = compose_job(*JOB, *overrides, "trainer.workers=2")
        try:
            metrics = driver.train(job, RunDirectory(self.run_dir), keep_workers=True)
        finally:
            self._ended.set()
            thread.join(timeout=30)
            if self._errors:  # the strike's failure first: it explains the job's
                raise self._errors[0]
        return metrics, self._capfd.readouterr().err


def kill_rank(rank: int, sig: int = signal.SIGKILL) -> Callable[[Scenario], None]:
    """A strike: once the first checkpoint is written, `sig` to rank `rank`'s process."""

    def strike(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(scenario.run_dir))
        os.kill(worker(scenario.run_dir, rank)["pid"], sig)

    return strike


def assert_same_parameters(run_dir: Path, reference: dict) -> None:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_worker_actor_killed_restarts_from_a_checkpoint_to_the_same_parameters(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """The path every failure took before healing, and still takes where healing does not apply
    (no survivor, a lost node, sharded state): every worker restarts from the last checkpoint."""
    run_dir = scenario.run_dir

    def kill_actor(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        ray.kill(ray.get_actor(worker(run_dir, 1)["actor"], namespace="distrain"))

    metrics, stderr = scenario.run(kill_actor, DROPOUT, "trainer.heal=false")
    assert "restart 1/3" in stderr
    assert metrics["restarts"] == 1 and metrics["steps"] == STEPS
    assert "rank 1" in metrics["failures"][0]["error"]
    failure = metrics["failures"][0]
    # The downtime a user sees covers detection and restart: from the last step before the
    # failure to the first logged one after it.
    assert 0 <= failure["detection_s"] < failure["downtime_s"]
    assert failure["recovery_s"] < failure["downtime_s"]
    assert_resumed_from_a_checkpoint(stderr)
    assert_same_parameters(run_dir, reference_dropout)


# The healing scenarios keep one checkpoint (step 10): later scheduled ones are skipped for the
# next 1000 s. A restart could only resume from step 10; a heal continues from a later step.
ONE_CHECKPOINT = "trainer.checkpoint_min_interval_s=1000"
HEALED = re.compile(
    r"healed (\d)/\d+: .*?; rank (\d) by (a warm spare|a new worker); the other workers kept "
    r"their processes and continue from step (\d+), held in memory by rank (\d) "
    r"\(no checkpoint read\)"
)


def assert_healed(
    stderr: str, failure: dict, *, rank: int, spare: bool, before: dict, after: dict
) -> None:
    """Healed in place: the failed rank replaced (by a spare or not), the survivor's process
    kept (the same pid), training continued from a step no checkpoint on disk holds."""
    healed = failure["healed"]
    assert healed["replaced"] == [rank] and healed["from_spares"] == ([rank] if spare else [])
    assert healed["from_step"] > 10, healed  # past the only checkpoint: it came from memory
    assert any(
        m.group(2) == str(rank) and int(m.group(4)) == healed["from_step"]
        for m in HEALED.finditer(stderr)
    ), stderr[-3000:]
    assert 0 <= failure["detection_s"] < failure["downtime_s"]
    assert failure["recovery_s"] < failure["downtime_s"]
    # Where the healing time went, within the recovery.
    phases = healed["phases_s"]
    assert set(phases) == {
        "survivors_stopped_s",
        "state_captured_s",
        "replacements_started_s",
        "rejoined_s",
    }, phases
    assert min(phases.values()) >= 0 and sum(phases.values()) <= failure["recovery_s"] + 0.01
    survivor = 1 - rank
    assert after["workers"][survivor]["pid"] == before["workers"][survivor]["pid"]
    assert after["workers"][rank]["pid"] != before["workers"][rank]["pid"]
    if spare:  # the spare that was ready took the rank
        assert after["workers"][rank]["actor"] in before["spares"], (before, after)


def workers_now(run_dir: Path) -> dict:
    return json.loads((run_dir / "workers.json").read_text())


def assert_every_epoch_logged(run_dir: Path) -> None:
    """A heal loses no epoch's figures: what the workers reported before the failure is drained."""
    from tests.test_cli import scalars

    assert [step for step, _ in scalars(run_dir)["epoch/val_loss"]] == list(range(1, EPOCHS + 1))


def assert_no_actor_left(*snapshots: dict) -> None:
    """Every worker and spare named in these workers.json snapshots is gone once the run ends,
    but the workers it kept for the next scenario (keep_workers=True): those are the last
    snapshot's, or none."""
    names = {w["actor"] for snap in snapshots for w in snap["workers"]}
    names |= {name for snap in snapshots for name in snap.get("spares", {})}
    names |= {name for snap in snapshots for name in snap.get("joining", {})}
    kept = warm_workers.kept_actor_names()
    assert kept in ([], [w["actor"] for w in snapshots[-1]["workers"]]), kept
    names -= set(kept)
    deadline = time.monotonic() + 30  # ray.kill is asynchronous: the names go soon after
    while names and time.monotonic() < deadline:
        for name in list(names):
            try:
                ray.get_actor(name, namespace="distrain")
            except ValueError:  # a dead named actor is no longer found
                names.discard(name)
        time.sleep(0.2)
    assert not names, f"actors left behind: {sorted(names)}"


def assert_bitwise_equal(run_dir: Path, reference: dict) -> None:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key


WAIT_FOR_REPLACEMENT = "trainer.train_while_replacing=false"


def test_worker_sigkilled_heals_in_place_from_a_survivor(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """trainer.train_while_replacing=false: the survivor waits for the new worker."""
    run_dir, seen = scenario.run_dir, {}

    def kill(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        seen["before"] = before = workers_now(run_dir)
        os.kill(before["workers"][1]["pid"], signal.SIGKILL)

    metrics, stderr = scenario.run(kill, DROPOUT, ONE_CHECKPOINT, WAIT_FOR_REPLACEMENT)
    before = seen["before"]
    assert metrics["restarts"] == 1 and metrics["steps"] == STEPS
    assert "restart 1/" not in stderr and "resuming from" not in stderr
    after = workers_now(run_dir)
    assert_healed(stderr, metrics["failures"][0], rank=1, spare=False, before=before, after=after)
    assert metrics["failures"][0]["healed"]["training_on"] is None and not metrics["grow_backs"]
    # Dropout: the replacement drew what the dead rank would have (streams of (rank, step)).
    assert_bitwise_equal(run_dir, reference_dropout)
    assert_every_epoch_logged(run_dir)
    assert_no_actor_left(before, after)


TRAINED_ON = re.compile(
    r"healed 1/\d+: .*?; rank\(s\) \[(\d)\] being replaced by new workers while the survivors "
    r"train on as 1 worker\(s\) \(the same global batch\) from step (\d+), held in memory by "
    r"rank (\d) \(no checkpoint read\)",
    re.DOTALL,
)


@pytest.mark.parametrize("killed", [0, 1])
def test_the_survivor_trains_on_while_the_replacement_starts(
    scenario: Scenario, reference_dropout: dict, killed: int
) -> None:
    """The default heal without a ready spare: the survivor goes on at once as a group of one
    (the same global batch: two micro-batches, each drawing from its configured rank's streams)
    while the new worker starts, then the group grows back to two after a step. Bitwise equal to
    the uninterrupted run, with dropout; whichever rank dies (rank 0's death re-ranks the
    survivor)."""
    run_dir, seen = scenario.run_dir, {}
    survivor = 1 - killed

    def kill(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        seen["before"] = before = workers_now(run_dir)
        os.kill(before["workers"][killed]["pid"], signal.SIGKILL)
        scenario.wait(lambda: len(workers_now(run_dir)["workers"]) == 1)
        seen["shrunk"] = shrunk = workers_now(run_dir)
        logged = scenario.step_logged
        scenario.wait(lambda: scenario.step_logged > logged)  # trained on alone
        # Held still until the new worker is ready (it imports torch on two busy cores: the
        # run must not end first); the math is untouched.
        with scenario.paused(shrunk["workers"][0]["pid"]):
            scenario.wait(
                lambda: None not in workers_now(run_dir).get("joining", {None: None}).values()
            )
        scenario.wait(lambda: len(workers_now(run_dir)["workers"]) == 2)

    metrics, stderr = scenario.run(kill, DROPOUT, ONE_CHECKPOINT, "logger.log_every_n_steps=1")
    before, shrunk, after = seen["before"], seen["shrunk"], workers_now(run_dir)
    assert metrics["restarts"] == 1 and metrics["steps"] == STEPS and metrics["workers"] == 2
    assert "restart 1/" not in stderr and "resuming from" not in stderr
    failure = metrics["failures"][0]
    healed = failure["healed"]
    assert healed["training_on"] == 1 and healed["replaced"] == [killed], healed
    assert healed["from_step"] > 10  # past the only checkpoint: it came from memory
    match = TRAINED_ON.search(stderr)
    assert match is not None and int(match.group(2)) == healed["from_step"], stderr[-3000:]
    assert 0 <= failure["detection_s"] < failure["downtime_s"]
    # The survivor kept its process, first alone as rank 0, then beside the new worker.
    kept = before["workers"][survivor]["pid"]
    assert [w["pid"] for w in shrunk["workers"]] == [kept]
    assert after["workers"][0]["pid"] == kept and after["workers"][1]["pid"] not in {
        w["pid"] for w in before["workers"]
    }
    assert [w["rank"] for w in after["workers"]] == [0, 1]
    (grown,) = metrics["grow_backs"]
    assert grown["in_place"] and grown["from_workers"] == 1 and grown["step"] > healed["from_step"]
    assert grown["downtime_s"] > 0 and grown["new_workers_ready_s"] > 0
    match = GREW_IN_PLACE.search(stderr)
    assert match is not None and int(match.group(1)) == grown["step"], stderr[-3000:]
    assert_bitwise_equal(run_dir, reference_dropout)
    assert_every_epoch_logged(run_dir)
    assert_no_actor_left(before, shrunk, after)


def test_a_heal_releases_a_survivor_waiting_for_a_synchronous_checkpoint(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """trainer.async_checkpoint=false: at a boundary the survivor waits until the checkpoint is on
    disk, which the dead rank's missing share never allows. A regression test: it used to wait
    out the heal's timeout (2 minutes) and restart from a checkpoint."""
    metrics, stderr = scenario.run(
        kill_rank(1), DROPOUT, "trainer.async_checkpoint=false", WAIT_FOR_REPLACEMENT
    )
    assert HEALED.search(stderr), stderr[-3000:]
    assert "healing failed" not in stderr
    assert metrics["steps"] == STEPS and metrics["failures"][0]["healed"]["replaced"] == [1]
    assert_bitwise_equal(scenario.run_dir, reference_dropout)


def spares_ready(run_dir: Path, count: int = 1) -> Callable[[], bool]:
    def ready() -> bool:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return (
                len(json.loads((run_dir / "workers.json").read_text()).get("spares", {})) >= count
            )
        return False

    return ready


def test_warm_spares_take_the_place_of_two_killed_workers_in_a_row(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """trainer.spare_workers=1: a killed rank's place is taken by the spare (no start-up), a new
    spare warms up in the background, and it takes the place of the next failure too."""
    run_dir, seen = scenario.run_dir, []

    def kill_twice(scenario: Scenario) -> None:
        scenario.wait(lambda: scenario.step_logged > 10)  # past the only checkpoint (step 10)
        for rank in (0, 1):  # two failures, one after the other
            # The run is held still until a spare is ready and the rank is killed: a spare
            # imports torch on two busy cores (seconds here, more under load), and the run must
            # not end first. The math is untouched: the same result, bitwise.
            before = workers_now(run_dir)
            with scenario.paused(before["workers"][0]["pid"]):
                scenario.wait(spares_ready(run_dir))
                before = workers_now(run_dir)  # with the ready spare's name
                os.kill(before["workers"][rank]["pid"], signal.SIGKILL)
            scenario.wait(lambda old=before["workers"]: workers_now(run_dir)["workers"] != old)
            seen.append((before, workers_now(run_dir)))
            if rank == 0:  # a step after the heal first, which closes its downtime
                logged = scenario.step_logged
                scenario.wait(lambda logged=logged: scenario.step_logged != logged)

    metrics, stderr = scenario.run(
        kill_twice, DROPOUT, ONE_CHECKPOINT, "trainer.spare_workers=1", step_delay_s=0.02
    )
    assert metrics["restarts"] == 2 and metrics["steps"] == STEPS
    for rank, (failure, (before, after)) in enumerate(zip(metrics["failures"], seen)):
        assert_healed(stderr, failure, rank=rank, spare=True, before=before, after=after)
    assert_bitwise_equal(run_dir, reference_dropout)
    assert_every_epoch_logged(run_dir)
    assert_no_actor_left(*(snapshot for pair in seen for snapshot in pair))


def test_frozen_worker_is_detected_named_and_recovered(
    scenario: Scenario, reference_dropout: dict
) -> None:
    run_dir, seen = scenario.run_dir, {}

    def freeze(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        seen["before"] = workers_now(run_dir)
        os.kill(seen["before"]["workers"][1]["pid"], signal.SIGSTOP)

    try:
        metrics, stderr = scenario.run(
            freeze, DROPOUT, ONE_CHECKPOINT, "trainer.step_timeout_s=4", WAIT_FOR_REPLACEMENT
        )
    finally:
        if "before" in seen:  # the heal kills it; continue it in case it did not
            with contextlib.suppress(ProcessLookupError):
                os.kill(seen["before"]["workers"][1]["pid"], signal.SIGCONT)
    before = seen["before"]
    frozen = before["workers"][1]
    assert metrics["restarts"] == 1
    error = metrics["failures"][0]["error"]
    assert "trainer.step_timeout_s=4" in error
    # The wait for the timeout is part of the downtime reported, not hidden. Detection runs from
    # the last progress of any rank: rank 0's last records can arrive up to a report interval
    # and a poll (0.25 s each) after the frozen rank's.
    assert 4 - 1 <= metrics["failures"][0]["detection_s"] < metrics["failures"][0]["downtime_s"]
    assert (
        error.index(f"rank 1 (node {frozen['node_ip']}, pid {frozen['pid']})")
        < error.find("rank 0")
        or "rank 0" not in error
    )  # the frozen rank is named first
    # Every rank's stack was dumped (py-spy reads a stopped process) and the error says where
    # the frozen rank was.
    hang_dir = run_dir / "hangs" / "failure-1"
    assert f"every rank's stack is in {hang_dir}" in error
    for rank in (0, 1):
        stack = (hang_dir / f"rank{rank}.txt").read_text()
        assert "distrain" in stack and "(no stack" not in stack, stack[-2000:]
    assert re.search(r"rank 1 is in \S+ \(\S+:\d+\)", error), error
    # Healed: the frozen process was killed and replaced; rank 0 kept its process.
    after = workers_now(run_dir)
    assert_healed(stderr, metrics["failures"][0], rank=1, spare=False, before=before, after=after)
    assert_bitwise_equal(run_dir, reference_dropout)


def test_a_failure_while_healing_falls_back_to_the_checkpoint(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """Rank 1 is killed; while its replacement starts, the survivor is killed too: healing
    fails, and every worker restarts from the last checkpoint, still to the same parameters."""
    run_dir, seen = scenario.run_dir, {}

    def kill_then_kill_the_survivor(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        seen["before"] = before = workers_now(run_dir)
        rank1 = before["workers"][1]["actor"]  # distrain-<group id>-rank1-<n>
        os.kill(before["workers"][1]["pid"], signal.SIGKILL)

        def replacement_started() -> bool:  # another actor named for rank 1: its replacement
            return any(
                a["name"].startswith(rank1.rsplit("-", 1)[0] + "-") and a["name"] != rank1
                for a in ray.util.list_named_actors(all_namespaces=True)
            )

        scenario.wait(replacement_started)
        os.kill(before["workers"][0]["pid"], signal.SIGKILL)  # the survivor, mid-heal

    metrics, stderr = scenario.run(kill_then_kill_the_survivor, DROPOUT, WAIT_FOR_REPLACEMENT)
    before = seen["before"]
    assert "healing failed (" in stderr and "restarting from the last checkpoint" in stderr
    assert_resumed_from_a_checkpoint(stderr)
    assert metrics["steps"] == STEPS and "healed" not in metrics["failures"][0]
    assert_bitwise_equal(run_dir, reference_dropout)
    assert_no_actor_left(before, workers_now(run_dir))


def test_the_survivor_killed_while_training_alone_falls_back_to_the_checkpoint(
    scenario: Scenario, reference_dropout: dict
) -> None:
    """Rank 1 is killed; while the survivor trains on alone and the new worker starts, the
    survivor is killed too: nothing survived, so every worker restarts from the last checkpoint
    (the starting worker is not left behind), still to the same parameters."""
    run_dir, seen = scenario.run_dir, {}

    def kill_then_kill_the_survivor(scenario: Scenario) -> None:
        scenario.wait(first_checkpoint(run_dir))
        seen["before"] = before = workers_now(run_dir)
        os.kill(before["workers"][1]["pid"], signal.SIGKILL)
        scenario.wait(lambda: len(workers_now(run_dir)["workers"]) == 1)
        seen["shrunk"] = shrunk = workers_now(run_dir)
        os.kill(shrunk["workers"][0]["pid"], signal.SIGKILL)

    metrics, stderr = scenario.run(kill_then_kill_the_survivor, DROPOUT)
    before, shrunk = seen["before"], seen["shrunk"]
    assert list(shrunk["joining"]) and TRAINED_ON.search(stderr), stderr[-3000:]
    restarted = re.search(
        r"restart 2/\d+: .*?; resuming from the checkpoint of step (\d+)", stderr, re.DOTALL
    )
    assert restarted is not None, stderr[-3000:]
    assert int(restarted.group(1)) % 10 == 0 or int(restarted.group(1)) % STEPS_PER_EPOCH == 0
    assert metrics["restarts"] == 2 and metrics["steps"] == STEPS
    assert_bitwise_equal(run_dir, reference_dropout)
    assert_no_actor_left(before, shrunk, workers_now(run_dir))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_ctrl_c_then_resume_ends_with_the_same_parameters(
    ray_address: str, tmp_path: Path, reference: dict, before: int, after: int
) -> None:
    run_dir = tmp_path / "run"
    proc = start(ray_address, run_dir, f"trainer.workers={before}")
    wait_for(first_checkpoint(run_dir), proc)
    proc.send_signal(signal.SIGINT)
    stderr = finish(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"distrain resume={run_dir}" in stderr
    stopped_at = checkpoint.load(
        run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    ).step
    assert 0 < stopped_at < STEPS

    resumed = run_cli(
        f"resume={run_dir}",
        f"trainer.workers={after}",
        f"cluster.address={ray_address}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at}" in resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["workers"] == after
    assert_same_parameters(run_dir, reference)
    # TensorBoard: the resumed run appended to the same event files without duplicate points.
    from tests.test_cli import scalars

    series = scalars(run_dir)
    steps = [step for step, _ in series["loss/train"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert [step for step, _ in series["epoch/val_loss"]] == list(range(1, EPOCHS + 1))


def test_ctrl_c_in_the_last_epoch_exits_130_and_keeps_the_finished_run(
    ray_address: str, tmp_path: Path
) -> None:
    """A regression test: a stop asked for in the last epoch used to be dropped once the workers
    reached the end anyway, and the run exited 0. Now it exits 130 and says so, and the
    finished run is recorded in full (nothing to resume)."""
    run_dir = tmp_path / "run"
    command = [
        *DISTRAIN,
        "trainer.epochs=2",
        "trainer.workers=2",
        "model.hidden_sizes=[32]",
        "logger.progress=plain",
        f"cluster.address={ray_address}",
        f"hydra.run.dir={run_dir}",
    ]
    free_kept_workers_before(command)
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=slowed(0, 0.1),  # ~2 s per epoch: the signal surely lands in the last epoch
    )
    wait_for(first_checkpoint(run_dir), proc)  # epoch 1's checkpoint: epoch 2 is the last
    proc.send_signal(signal.SIGINT)
    stderr = finish(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: the stop arrived as training ended" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (1437 // 64) and "overrides" in metrics
    assert (run_dir / "model.pt").exists()


def test_too_many_failures_stop_with_the_last_checkpoint_intact(scenario: Scenario) -> None:
    run_dir = scenario.run_dir
    with pytest.raises(TrainingFailed) as failed:  # the CLI's exit 1
        scenario.run(kill_rank(1), "trainer.max_failures=0")
    assert "gave up after trainer.max_failures=0 restarts" in str(failed.value)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    assert str(latest) in str(failed.value)
    assert checkpoint.load(latest).step > 0


def test_corrupt_checkpoint_is_named_and_an_older_one_resumes(
    ray_address: str, tmp_path: Path
) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    short = ["trainer.epochs=2", "trainer.checkpoint_every_n_steps=10", "logger.progress=none"]
    driver.train(compose_job(*short, f"hydra.run.dir={run_dir.path}"), run_dir)
    store = CheckpointStore(run_dir.checkpoints, keep=3)
    checkpoints = store.all()[-3:]  # trainer.keep_checkpoints, and the best one besides
    assert [p.name for p in checkpoints] == [f"step-{s:09d}" for s in (30, 40, 44)]
    assert set(store.all()) <= {*checkpoints, store.best()}
    shard = checkpoints[-1] / "shard-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    # The run dir has no .hydra/ (it was run in-process), so the job is given in full again.
    broken = run_cli(
        *short, f"resume={run_dir.path}", f"cluster.address={ray_address}", cwd=tmp_path
    )
    assert broken.returncode == 2
    assert f"checkpoint {checkpoints[-1]} cannot be read" in broken.stderr
    assert f"resume={checkpoints[-2]}" in broken.stderr  # the way out is named
    assert "Traceback" not in broken.stderr

    older = run_cli(
        *short, f"resume={checkpoints[-2]}", f"cluster.address={ray_address}", cwd=tmp_path
    )
    assert older.returncode == 0, older.stderr[-3000:]
    assert json.loads(run_dir.metrics_path.read_text())["steps"] == 44


def test_garbage_is_not_a_checkpoint(tmp_path: Path) -> None:
    from distrain.config import ConfigError

    bad = tmp_path / "step-000000001.pt"  # format 1: one torch.save file
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(bad)
    torch.save({"weights": torch.zeros(2)}, bad)  # loadable, but not ours
    with pytest.raises(ConfigError, match="not a distrain checkpoint"):
        checkpoint.load(bad)
    directory = tmp_path / "step-000000002"  # format 2: a directory
    directory.mkdir()
    (directory / "meta.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(directory)
    (directory / "meta.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(ConfigError, match="not a distrain checkpoint"):
        checkpoint.load(directory)


def _meta(step: int, rows: int, world_size: int) -> dict:
    """A format-2 index for one tensor `w` split by rows over `world_size` shards."""
    from distrain.shards import chunk_rows

    pieces = [
        {"shard": r, "rows": list(chunk_rows(rows, r, world_size))} for r in range(world_size)
    ]
    return {
        "step": step,
        "epoch": 0,
        "step_in_epoch": step,
        "tensors": {"model/w": {"shape": [rows], "dtype": "float32", "pieces": pieces}},
    }


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    from distrain.config import ConfigError

    store = CheckpointStore(tmp_path, keep=3)
    halves = torch.arange(10.0).chunk(2)
    saved = store.save(_meta(1, 10, 2), [lambda half=half: {"model/w": half} for half in halves])
    loaded = checkpoint.load(saved.path)
    assert torch.equal(torch.cat([read()["model/w"] for read in loaded.shards]), torch.arange(10.0))
    meta = json.loads((saved.path / "meta.json").read_text())
    meta["tensors"]["model/w"]["pieces"].pop()  # an index that lost a piece
    (saved.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="model/w has 5 of its rows"):
        checkpoint.load(saved.path)
    (saved.path / "shard-00001-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(saved.path)


WRITER = """
import sys, torch
from pathlib import Path
from distrain.checkpoint import CheckpointStore
from tests.test_faults import _meta
store = CheckpointStore(Path(sys.argv[1]), keep=3)
store.save(_meta(1, 4, 2), [lambda: {"model/w": torch.ones(2)}, lambda: {"model/w": torch.ones(2)}])
print("first", flush=True)
big = torch.randn(30_000_000)  # 2 x 120 MB: killed while writing these
store.save(_meta(2, 60_000_000, 2), [lambda: {"model/w": big}, lambda: {"model/w": big.clone()}])
"""


def test_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".step-000000002.tmp-*/*")):
            assert time.monotonic() < deadline and proc.poll() is None, "the write never began"
            time.sleep(0.01)
        proc.kill()  # SIGKILL in the middle of writing step 2's shards
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    store = CheckpointStore(tmp_path, keep=3)
    assert [p.name for p in store.all()] == ["step-000000001"]
    latest = store.latest()
    assert latest is not None and latest.name == "step-000000001"
    loaded = checkpoint.load(latest)
    assert loaded.step == 1
    assert [read()["model/w"].tolist() for read in loaded.shards] == [[1.0, 1.0], [1.0, 1.0]]


def _nan_dataset(path: Path) -> None:
    """digits-sized random data with one NaN in a training sample (not in the validation split)."""
    import numpy as np

    generator = np.random.default_rng(0)
    x = generator.normal(size=(640, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    # distrain.data.tensors splits with torch.randperm(seed); index order[-1] is a training sample
    order = torch.randperm(640, generator=torch.Generator().manual_seed(0))
    x[order[-1].item(), 3] = np.nan
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("policy", ["skip_step", "stop"])
def test_nan_in_the_data(ray_address: str, tmp_path: Path, policy: str) -> None:
    data = tmp_path / "nan.npz"
    _nan_dataset(data)
    job = compose_job(
        "data._target_=distrain.data.tensors.tensors",
        f"+data.path={data}",
        "data.batch_size=64",
        "trainer.epochs=3",
        f"trainer.nan_policy={policy}",
        "logger.progress=none",
    )
    run_dir = RunDirectory(tmp_path / "run")
    if policy == "stop":
        with pytest.raises(TrainingFailed) as failed:  # the CLI's exit 1
            driver.train(job, run_dir, keep_workers=True)
        assert re.search(
            r"by step \d+ \(epoch [1-3]\): the loss or the averaged gradient is NaN",
            str(failed.value),
        ), str(failed.value)
        assert "trainer.nan_policy=skip_step" in str(failed.value)
        return
    metrics = driver.train(job, run_dir, keep_workers=True)
    # The NaN sample is in one batch per epoch, unless it fell in an epoch's left-over tail.
    assert 1 <= metrics["skipped_steps"] <= 3
    assert math.isfinite(metrics["val_loss"])  # the skipped steps did no harm
    from tests.test_cli import scalars

    assert scalars(tmp_path / "run")["faults/skipped_steps"][-1][1] == metrics["skipped_steps"]


# Ray declares a node whose raylet stopped answering dead after 3 missed health checks a second
# apart (by default 5, 3 s apart, after 5 s): what a cluster tuned for fast failover sets, and
# ~12 s less per scenario. distrain's own detection (a broken collective, silence) is unchanged.
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def two_nodes() -> object:
    """A real two-node Ray cluster on this machine: a head and one more node, 1 CPU each. The
    scenarios remove the second node; `second_node` adds one again for the next."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        # The agent on a free port: Ray's default one may be another Ray's (ray_startup.py).
        head_node_args={
            "num_cpus": 1,
            "_system_config": FAST_NODE_DEATH,
            "dashboard_agent_listen_port": 0,
        },
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def second_node(cluster: Any) -> Any:
    """The cluster's node besides the head, started if the last scenario removed it."""
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    return next(iter(cluster.worker_nodes))


def start_elastic(
    cluster: Any, run_dir: Path, *overrides: str, step_delay_s: float = 0.0
) -> subprocess.Popen:
    """The job on the two-node cluster, one worker per node, allowed to shrink to one."""
    return subprocess.Popen(
        [
            *DISTRAIN,
            *JOB,
            f"cluster.address={cluster.address}",
            "cluster.placement=STRICT_SPREAD",
            "trainer.workers=2",
            "trainer.min_workers=1",
            "cluster.connect_timeout_s=5",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=run_dir.parent,
        stderr=subprocess.PIPE,
        text=True,
        env=slowed(0, step_delay_s),
    )


def test_node_lost_continues_elastically_on_fewer_workers(
    two_nodes: object, tmp_path: Path, reference: dict
) -> None:
    cluster = two_nodes
    node = second_node(cluster)
    run_dir = tmp_path / "run"
    proc = start_elastic(cluster, run_dir)
    wait_for(first_checkpoint(run_dir), proc)
    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    assert len({w["node_id"] for w in workers}) == 2  # one worker per node
    cluster.remove_node(node, allow_graceful=False)  # the node is gone, as if pre-empted
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "elastic: continuing on 1 of 2 workers" in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 1 and metrics["restarts"] >= 1 and metrics["steps"] == STEPS
    # Same global batch on one worker (accumulating two micro-batches): the same training.
    assert_same_parameters(run_dir, reference)


GREW_IN_PLACE = re.compile(
    r"grew back from 1 to 2 workers at step (\d+) in [\d.]+ s: the 1 training kept their "
    r"processes, 1 joined with the state from memory \(no checkpoint read\)"
)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "from_checkpoint"])
def test_node_lost_then_back_grows_back_to_the_configured_workers(
    two_nodes: object, tmp_path: Path, reference: dict, in_place: bool
) -> None:
    """Shrink when a node is lost, grow back when a node joins: still the uninterrupted run.
    Where a failure heals in place, the group grows in place too: after its next step, the
    running worker keeps its process (a grow from a checkpoint starts every worker anew); with
    trainer.heal=false (as on GPUs, or with sharded state) from the next checkpoint."""
    cluster = two_nodes
    node = second_node(cluster)
    run_dir = tmp_path / "run"
    # 60 ms a step on rank 0 (the result does not change): time for a node to join.
    overrides = [] if in_place else ["trainer.heal=false"]
    proc = start_elastic(cluster, run_dir, *overrides, step_delay_s=0.06)
    try:
        wait_for(first_checkpoint(run_dir), proc)
        cluster.remove_node(node, allow_graceful=False)
        lines = []
        for line in proc.stderr:  # until the run goes on with one worker
            lines.append(line)
            if "elastic: continuing on 1 of 2 workers" in line:
                break
        assert proc.poll() is None, "".join(lines)[-3000:]
        shrunk = json.loads((run_dir / "workers.json").read_text())["workers"]
        cluster.add_node(num_cpus=1)  # capacity is back
        stderr = "".join(lines) + finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == STEPS
    grow_back = metrics["grow_backs"][0]
    assert grow_back["from_workers"] == 1 and 0 < grow_back["step"] < STEPS, metrics["grow_backs"]
    assert grow_back["in_place"] is in_place and grow_back["downtime_s"] > 0, grow_back
    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    assert len({w["node_id"] for w in workers}) == 2  # one per node again, the new one included
    if in_place:
        grew = GREW_IN_PLACE.search(stderr)
        assert grew and int(grew.group(1)) == grow_back["step"], stderr[-3000:]
        assert workers[0]["pid"] == shrunk[0]["pid"]  # the running worker kept its process
        assert set(grow_back["phases_s"]) == {"state_captured_s", "workers_started_s", "rejoined_s"}
        # The new worker started while the one worker trained on: not part of the downtime.
        assert grow_back["new_workers_ready_s"] > 0, grow_back
    else:
        expected = (
            f"growing back from 1 to 2 workers, from the checkpoint of step {grow_back['step']}"
        )
        assert expected in stderr, stderr[-3000:]
        assert workers[0]["pid"] != shrunk[0]["pid"]  # every worker started anew
    assert_same_parameters(run_dir, reference)


def test_a_shrunk_group_grows_back_in_place_with_a_ready_warm_spare(
    two_nodes: object, tmp_path: Path, reference: dict
) -> None:
    """A warm spare that is ready is capacity too: half a CPU per worker, so after the second
    node is lost the head holds the one worker left and a spare, which takes the missing rank
    once it is warm (the grow probe, which must avoid the head under STRICT_SPREAD, stays
    pending: no node is added)."""
    cluster = two_nodes
    node = second_node(cluster)
    run_dir = tmp_path / "run"
    proc = start_elastic(
        cluster,
        run_dir,
        "trainer.spare_workers=1",
        "trainer.cpus_per_worker=0.5",
        step_delay_s=0.06,
    )
    try:
        wait_for(first_checkpoint(run_dir), proc)
        cluster.remove_node(node, allow_graceful=False)
        stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "elastic: continuing on 1 of 2 workers" in stderr, stderr[-3000:]
    assert "elastic: 1 warm spare(s) ready; growing back to trainer.workers=2" in stderr
    grew = GREW_IN_PLACE.search(stderr)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    grow_back = metrics["grow_backs"][0]
    assert grew and int(grew.group(1)) == grow_back["step"] and grow_back["in_place"], stderr
    assert metrics["workers"] == 2 and metrics["steps"] == STEPS
    assert_same_parameters(run_dir, reference)


def test_worker_killed_during_a_background_write_recovers_to_the_synchronous_result(
    scenario: Scenario, references: dict[str, Any]
) -> None:
    """trainer.async_checkpoint=true (the default) ends with the parameters of a synchronous
    run; a worker SIGKILLed while the driver writes a checkpoint in the background leaves
    either that checkpoint complete or the previous one as the latest, and the run recovers
    from it to the same parameters."""
    sync, expected = references["synchronous_metrics"], references["synchronous"]
    assert all(a["checkpoint_blocking_s"] > 0 for a in sync["aggregator"])
    run_dir = scenario.run_dir
    checkpoints = run_dir / "checkpoints"

    def writing() -> bool:  # a checkpoint exists, and the next one is being written
        return (checkpoints / "latest").exists() and any(checkpoints.glob(".step-*.tmp-*/shard-*"))

    def kill_while_writing(scenario: Scenario) -> None:
        scenario.wait(writing, timeout_s=180)
        os.kill(worker(run_dir, 1)["pid"], signal.SIGKILL)  # while a write is in progress

    metrics, stderr = scenario.run(kill_while_writing, *WIDE, "trainer.heal=false")
    assert metrics["restarts"] == 1 and metrics["steps"] == sync["steps"]
    step = int(RESUMED_FROM.search(stderr).group(1))
    assert step % 4 == 0 or step % STEPS_PER_EPOCH == 0, step
    assert not list(checkpoints.glob(".step-*"))  # no half-written checkpoint is left
    assert_same_parameters(run_dir, expected)

"""The supervisor: start a worker group, watch it, heal or restart it, record what it reports.

It takes no part in training steps: workers run the loop (SPMD) and report to a sink that it
drains a few times a second into TensorBoard, the terminal, checkpoints and metrics.json.
When a worker dies or hangs, the supervisor heals the group in place (the others keep their
processes and state; a spare or a new worker takes the failed rank) or, where that does not
apply (a lost node, sharded state), tears it down and starts a new one from the last checkpoint,
on fewer workers if the cluster shrank and `trainer.min_workers` allows it; up to
`trainer.max_failures` times.

This module keeps the restart loop; beside it: `preflight` (checks before any training),
`starting` (a group planned, placed and started, retried), `healing` (a failed rank replaced in
place), `elastic` (a smaller group), `watch` (results, failures, silent ranks, Ctrl-C),
`failures` (their count and timings), `saving` (checkpoint records to writes, the restart
point), `recording` (TensorBoard, the terminal, the summary).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import ray
import torch

from distrain import checkpoint, elastic, healing, preflight, simulate, standby, warm_workers
from distrain.config import Config
from distrain.data.base import SharedSplits, Splits
from distrain.early_stopping import EarlyStopping
from distrain.errors import GroupFailed, Interrupted
from distrain.failures import FailureLog
from distrain.group import WorkerGroup
from distrain.metrics import EpochMetrics, MetricsCollector
from distrain.plan import StepPlan
from distrain.recording import RunRecorder
from distrain.records import CheckpointRecord, EpochRecord, RankResult, Record, StepRecord
from distrain.rundir import RunDirectory
from distrain.saving import Checkpoints
from distrain.starting import GroupStarter
from distrain.watch import StopAtBoundary, StopRequest, check_hang, first_line, rank_result

log = logging.getLogger("distrain")
POLL_S = 0.25  # how often the driver drains metrics and checks on the workers
# In-memory data up to this size goes to the workers from the driver's dry build, through the
# object store (`SharedSplits`): a worker then imports no dataset code and reads no file, and a
# node holds one copy, which its workers map. Larger data stays out of the object store (Ray's
# default share of memory is 30 %); each worker builds it, as it does data read item by item.
SHIP_SPLITS_MAX_BYTES = 512 * 2**20


class Supervisor:
    """Runs worker groups until training completes, restarting after infrastructure failures."""

    def __init__(
        self,
        job: Config,
        run_dir: RunDirectory,
        splits: Splits,
        plan: StepPlan,
        device_type: str,
        overrides: list[str],
        slow_rank: simulate.SlowRank | None = None,  # DISTRAIN_SLOW_RANK (tests, demos)
        *,
        keep_workers: bool = False,  # for the next job of this process (warm_workers.py)
        started_ahead: warm_workers.KeptWorkers | None = None,  # early_start.py
    ) -> None:
        self.job, self.run_dir = job, run_dir
        self.splits, self.plan, self.overrides = splits, plan, overrides
        self.trainer, self.task = job.trainer, splits.task
        self.keep_workers = keep_workers
        self.started_ahead = started_ahead
        self.recorder = RunRecorder(run_dir, job.logger.progress)
        self.history: list[EpochMetrics] = []
        self.failures = FailureLog(self.trainer.max_failures)
        self.starter = GroupStarter(job, plan, device_type, slow_rank, self.failures, self.recorder)
        # A shrunk group grows back in place where a failure would heal in place (healing.py).
        self.grows_in_place = healing.never(job, device_type, plan.world_size) is None
        self.checkpoints = Checkpoints(
            run_dir.checkpoints,
            self.trainer,
            {group: getattr(job, group) for group in preflight.RESUME_MUST_MATCH},
            self.recorder.message,
        )
        self.resume: checkpoint.Checkpoint | None = None  # what `run` continues from
        self.stop_requested = False  # Ctrl-C/SIGTERM seen, even if the workers finished anyway
        self.current_nodes: list[dict[str, Any]] = []
        self.grow_backs: list[dict[str, Any]] = []  # elastic: each return to trainer.workers
        self.grow_since_s: float | None = None  # the last progress before the last grow back
        self.early_stopping = EarlyStopping(
            self.trainer.early_stopping_patience, self.checkpoints.val_losses
        )
        self.early_stopped: dict[str, Any] | None = None  # where and why, if it stopped early

    def run(self, resume: checkpoint.Checkpoint | None, started: float) -> dict[str, Any]:
        """Train to the end; `started` is the job's perf_counter start (for wall_s)."""
        restore_from = resume  # the checkpoint the next group starts from
        self.resume = resume
        if resume is not None:
            self.checkpoints.resumed_from(resume)
            self.history = [EpochMetrics(**e) for e in resume.meta.get("history", [])]
        small = self.splits.tensor_bytes <= SHIP_SPLITS_MAX_BYTES
        shared = SharedSplits.of(self.splits) if small else None
        self.starter.splits_ref = ray.put(shared) if shared is not None else None
        self.starter.claim(self.started_ahead)
        try:
            planned = self.starter.plan()  # a job the cluster cannot hold ends before any output
            healed: WorkerGroup | None = None
            while True:
                if healed is None:  # a new group: its figures start afresh, after the history
                    group, planned = self.starter.start(restore_from, planned), None
                    collector = MetricsCollector(group.world_size, self.task, self.history)
                else:  # the same ranks: steps a failed rank had reported still complete
                    group, healed = healed, None
                try:
                    results = self._watch(group, collector)
                    if results is None:  # stopped to grow back
                        self.grow_since_s = self.failures.last_progress_s
                        grown = self._grow_in_place(group) if self.grows_in_place else None
                        if grown is None:
                            restore_from = self._grow_back(group)
                            continue
                        healed = grown  # a group that keeps its workers, as a healed one does
                        collector = MetricsCollector(grown.world_size, self.task, self.history)
                        continue
                    result = self._finish(group, results)
                    if self.keep_workers:
                        group.keep(self.starter.shape(group.world_size))
                    self.recorder.finish(result, wall_s=time.perf_counter() - started)
                    return result
                except GroupFailed as failure:
                    self.failures.count(
                        failure,
                        here=ray.get_runtime_context().get_node_id(),
                        latest=self.checkpoints.latest(),
                        resume_dir=self.run_dir.path,
                    )
                    self.checkpoints.after_failure()
                    healed = self._heal(group, failure, collector)
                    if healed is None:
                        restore_from = self._recover(failure)
                    elif healed.world_size != group.world_size:  # the survivors train on
                        collector = MetricsCollector(healed.world_size, self.task, self.history)
                finally:
                    group.shutdown()  # a healed group has taken everything but what failed
        finally:
            self.starter.release()  # workers claimed but never taken by a group
            self.recorder.close()

    def _heal(
        self, group: WorkerGroup, failure: GroupFailed, collector: MetricsCollector
    ) -> WorkerGroup | None:
        """The group with its failed ranks replaced and its survivors kept (None: restart from
        the last checkpoint instead; distrain/healing.py says when)."""
        reason = healing.why_not(self.job, group, failure)
        if reason is not None:
            log.info("not healing in place (%s): restarting from the last checkpoint", reason)
            return None
        try:
            healed = healing.heal(
                group,
                failure.failed_ranks,
                timeout_s=min(self.trainer.step_timeout_s, self.trainer.setup_timeout_s),
                assemble=self.checkpoints.assemble,
                train_while_replacing=self.trainer.train_while_replacing,
            )
        except GroupFailed as error:
            self.recorder.message(
                f"healing failed ({first_line(error)}); restarting from the last checkpoint"
            )
            return None
        # What the workers reported before the failure and the driver had not drained yet
        # (an epoch's figures, logged steps; the survivors flushed theirs when they stood down).
        with contextlib.suppress(GroupFailed):
            for record in group.drain():
                metrics = collector.add(record)
                self.checkpoints.recorded(metrics)
                self.recorder.record(metrics)
        for figures in collector.complete_without(failure.failed_ranks):
            self.recorder.record_incomplete(figures)
        self.failures.recovered(healed.record())
        count = len(self.failures)
        self.recorder.message(f"healed {count}/{self.trainer.max_failures}: {failure}; {healed}")
        self.recorder.restarted(count, healed.from_step, failure, how="healed")
        self.recorder.write_workers(healed.group)
        return healed.group

    def _recover(self, failure: GroupFailed) -> checkpoint.Checkpoint | None:
        """The checkpoint a new group starts from after `failure` (None: the start)."""
        restarts, limit = len(self.failures), self.trainer.max_failures
        restore_from = self.checkpoints.restart_point()
        step = restore_from.step if restore_from else 0
        self.recorder.message(
            f"restart {restarts}/{limit}: {failure}; resuming from "
            + (f"the checkpoint of step {step}" if restore_from else "the start")
        )
        self.recorder.restarted(restarts, step, failure)
        self.history = [e for e in self.history if e.step <= step]
        return restore_from

    def _watch(self, group: WorkerGroup, collector: MetricsCollector) -> list[RankResult] | None:
        """Wait for every rank's `fit`, streaming records; a dead or silent rank fails the group.

        None: the group stopped because the configured worker count fits again (elastic runs
        that lost workers), after a step or at a checkpoint boundary (`grows_in_place`); the
        supervisor then grows it back.
        """
        self.recorder.watch_group(group, self.job.logger)
        self.current_nodes = group.nodes
        # A group whose new workers already start (survivors training on) needs no probe.
        probe = None if group.joining else self._grow_probe(group)
        can_grow = probe is not None or bool(group.joining)
        refs = group.fit(pause_at_any_step=self.grows_in_place and can_grow)
        # The event file and the terminal view open as the first group starts training, not on
        # the way to its first step (~0.1 s of this process's CPU).
        if self.recorder.tensorboard is None:
            self.recorder.open(self.job, self.splits, self.overrides, self.resume, self.plan)
        pending, results = list(refs), []
        last_seen_s = dict.fromkeys(range(group.world_size), time.monotonic())
        self.checkpoints.begin_group()
        boundary = StopAtBoundary(group.sink, self.trainer.stop_timeout_s, self.recorder.message)
        with StopRequest() as stop:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    results.append(rank_result(ref, refs[ref], group))
                for record in group.drain():
                    last_seen_s[record.rank] = time.monotonic()
                    self._take(record, group, collector)
                self.checkpoints.settle(wait=False, nodes=self.current_nodes)
                if group.spares and standby.newly_ready(group.spares):
                    self.recorder.write_workers(group)
                check_hang(
                    {refs[r] for r in pending},
                    last_seen_s,
                    group,
                    timeout_s=self.trainer.step_timeout_s,
                    stacks_dir=self.run_dir.path / "hangs" / f"failure-{len(self.failures) + 1}",
                )
                if boundary.stop_waited_out(stop.requested):
                    break
                if not boundary.asked and (reason := self.early_stopping.reason()):
                    boundary.stop_early(reason)
                if can_grow and not boundary.asked:
                    self._grow_when_ready(group, probe, boundary)
        self.stop_requested = self.stop_requested or stop.requested
        # the last checkpoint is on disk before the run ends
        self.checkpoints.settle(wait=True, nodes=self.current_nodes)
        growing = boundary.growing and not stop.requested
        early = None if stop.requested else boundary.early_stop_reason
        return self._outcome(results, gave_up=bool(pending), growing=growing, early_stop=early)

    def _outcome(
        self, results: list[RankResult], *, gave_up: bool, growing: bool, early_stop: str | None
    ) -> list[RankResult] | None:
        """Every rank's result; None if the group stopped together to grow back; Interrupted if
        it stopped before the end (Ctrl-C, SIGTERM) or the wait for its ranks to stop was given
        up; a stop for early stopping ends the run as done."""
        if growing and results and all(r.stopped for r in results):
            return None
        if early_stop and not gave_up and any(r.stopped for r in results):
            self.early_stopped = {"step": max(r.steps for r in results), "reason": early_stop}
            return results
        if gave_up or any(r.stopped for r in results):
            latest = self.checkpoints.latest()
            raise Interrupted(
                f"stopped at step {self.checkpoints.last_step}; "
                + (
                    f"checkpoint {latest}. Continue with: distrain resume={self.run_dir.path}"
                    if latest
                    else "no checkpoint was written."
                )
            )
        return results

    def _grow_probe(self, group: WorkerGroup) -> elastic.GrowProbe | None:
        """For a group smaller than configured: what says the missing workers fit again. The
        group owns it, so its shutdown releases it."""
        missing = self.plan.world_size - group.world_size
        if missing <= 0:
            return None
        group.grow_probe = elastic.GrowProbe(
            self.starter.resources(missing),
            self.job.cluster.placement.value,
            running_nodes=[node["node_id"] for node in group.nodes],
        )
        return group.grow_probe if group.grow_probe.group is not None else None

    def _grow_when_ready(
        self, group: WorkerGroup, probe: elastic.GrowProbe | None, boundary: StopAtBoundary
    ) -> None:
        """Once the probe is placed, grow back from the next checkpoint; or, in place, start
        the new workers in its reservation first (or take ready warm spares), and pause the
        group once they are ready."""
        missing = self.plan.world_size - group.world_size
        if group.joining:
            if standby.all_warm(group.joining):
                self.recorder.write_workers(group)
                boundary.grow_back(self.plan.world_size, in_place=True)
        elif self.grows_in_place and group.join_with_spares(missing):
            self.recorder.message(
                f"elastic: {missing} warm spare(s) ready; growing back to "
                f"trainer.workers={self.plan.world_size} with them"
            )
        elif probe is not None and probe.ready():
            if not self.grows_in_place:
                boundary.grow_back(self.plan.world_size, in_place=False)
                return
            self.recorder.message(
                f"elastic: there is room for trainer.workers={self.plan.world_size} workers "
                f"again; starting {missing} new, training on meanwhile"
            )
            group.start_joining(probe.take(), missing)

    def _grow_in_place(self, group: WorkerGroup) -> WorkerGroup | None:
        """The group, paused after a step, grown back to the configured count with its workers
        kept (None: that failed, grow back from the last checkpoint instead)."""
        try:
            grown = healing.grow(
                group,
                self.plan,
                timeout_s=self.trainer.setup_timeout_s,
                assemble=self.checkpoints.assemble,
            )
        except GroupFailed as error:
            self.recorder.message(
                f"growing back in place failed ({first_line(error)}); growing back from the last "
                "checkpoint"
            )
            return None
        self.grow_backs.append(grown.record())
        added = self.plan.world_size - group.world_size
        self.recorder.message(
            f"grew back from {group.world_size} to {self.plan.world_size} workers at step "
            f"{grown.step} in {sum(grown.phases_s.values()):.2f} s: the {group.world_size} "
            f"training kept their processes, {added} joined with the state from memory (no "
            "checkpoint read)"
        )
        self.recorder.write_workers(grown.group)
        return grown.group

    def _grow_back(self, group: WorkerGroup) -> checkpoint.Checkpoint | None:
        """The checkpoint to start the configured count from: the one the stopped group wrote
        (None: the start, if growing back in place failed before any checkpoint)."""
        restore_from = self.checkpoints.restart_point()
        step = restore_from.step if restore_from else 0
        self.grow_backs.append({"step": step, "from_workers": group.world_size, "in_place": False})
        self.starter.growing_back = True
        self.recorder.message(
            f"elastic: growing back from {group.world_size} to {self.plan.world_size} workers, "
            + (f"from the checkpoint of step {step}" if restore_from else "from the start")
        )
        return restore_from

    def _take(self, record: Record, group: WorkerGroup, collector: MetricsCollector) -> None:
        """One record from a rank: progress, a checkpoint share, or figures to record."""
        if isinstance(record, StepRecord | EpochRecord):
            now_s = time.monotonic()
            self.failures.progressed(now_s)
            if self.grow_since_s is not None:  # the first progress after a grow back
                self.grow_backs[-1]["downtime_s"] = round(now_s - self.grow_since_s, 3)
                self.grow_since_s = None
        if isinstance(record, CheckpointRecord):
            self.checkpoints.add(record, group.world_size, self.history, group.sink)
            return
        metrics = collector.add(record)  # None for a heartbeat, or a step not all ranks reported
        self.checkpoints.recorded(metrics)  # first: an epoch's checkpoint carries its evaluation
        if isinstance(metrics, EpochMetrics):
            self.checkpoints.epoch_recorded(self.history, group.sink)
        self.recorder.record(metrics)

    def _finish(self, group: WorkerGroup, results: list[RankResult]) -> dict[str, Any]:
        """model.pt from rank 0, and the run's figures."""
        rank0 = next(r for r in results if r.rank == 0)
        torch.save(rank0.state_dict, self.run_dir.model_path)
        summary = self.recorder.summary(
            group,
            results,
            task=self.task,
            history=self.history,
            failures=self.failures.to_json(),
            checkpoints=self.checkpoints.stats(),
        )
        return {**summary, "grow_backs": self.grow_backs, "early_stopped": self.early_stopped}

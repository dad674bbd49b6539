"""Starting the supervisor's worker groups: how many workers, on which processes, retried.

The first group starts on the workers started while the job was checked (early_start.py) or
kept by the last job (warm_workers.py), where there are any. A group after a failure is planned
afresh: the configured count, or after a lost node the most that fit (at least
`trainer.min_workers`, elastic.py), and its start is retried while the cluster's view settles,
for trainer.setup_timeout_s.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from distrain import checkpoint, elastic, healing, reservation, simulate, warm_workers
from distrain.config import Config
from distrain.device import worker_gpus
from distrain.errors import (
    ConfigError,
    GroupFailed,
    SetupTransportFailed,
    TrainingFailed,
    WorkerError,
)
from distrain.failures import FailureLog
from distrain.group import WorkerGroup
from distrain.plan import StepPlan
from distrain.recording import RunRecorder

GROW_SETTLE_S = 10.0  # growing back: how long the configured count may take to fit again
Planned = tuple[StepPlan, bool]  # a group's plan; whether it fits once the autoscaler adds nodes


class GroupStarter:
    def __init__(
        self,
        job: Config,
        plan: StepPlan,
        device_type: str,
        slow_rank: simulate.SlowRank | None,
        failures: FailureLog,
        recorder: RunRecorder,
    ) -> None:
        self.job, self.trainer = job, job.trainer
        self.configured, self.device_type = plan, device_type  # the configured group's plan
        self.slow_rank, self.failures, self.recorder = slow_rank, failures, recorder
        self.splits_ref: Any = None  # the driver's in-memory data in the object store, if any
        self.kept: warm_workers.KeptWorkers | None = None  # for the first group (`claim`)
        self.growing_back = False  # the next group is the configured count again

    def claim(self, started_ahead: warm_workers.KeptWorkers | None) -> None:
        """The first group's workers: those started while the job was checked (early_start.py),
        or the last job's if they fit this one (any others are freed before the group is
        planned, so that its resource check sees what they held)."""
        shape = self.shape(self.configured.world_size)
        if started_ahead is None:
            self.kept = warm_workers.claim(shape)
        elif started_ahead.shape == shape:
            self.kept = started_ahead
        else:  # started for another device or size: a defect, but a harmless one
            warm_workers.free(started_ahead)

    def release(self) -> None:
        """Free the workers claimed but not taken by a group (the job ended before one)."""
        kept, self.kept = self.kept, None
        if kept is not None:
            warm_workers.free(kept)

    def resources(self, world_size: int) -> reservation.WorkerResources:
        """What a group of `world_size` workers needs from the cluster."""
        return reservation.WorkerResources(
            world_size,
            self.trainer.cpus_per_worker,
            worker_gpus(self.device_type, self.trainer.gpus_per_worker),
            excluded_nodes=self.failures.excluded_nodes,
        )

    def shape(self, world_size: int) -> warm_workers.Shape:
        """What workers kept for another job must share with these to run them."""
        need = self.resources(world_size)
        return warm_workers.Shape.of(need, self.job.cluster, self.device_type)

    def start(
        self, restore_from: checkpoint.Checkpoint | None, planned: Planned | None
    ) -> WorkerGroup:
        """Start a worker group (on `planned`, if the cluster was just checked for it); after a
        failure, keep trying for trainer.setup_timeout_s.

        Right after a node is lost Ray still counts it (and its freed CPUs) for a while, until
        its heartbeats are missed: placing the group can fail a few times before the cluster's
        view settles, and that is not a configuration error.
        """
        ref = None
        if restore_from is not None:  # each shard in the object store once; a worker takes its rows
            shards = [ray.put(read()) for read in restore_from.shards]
            ref = ray.put({"meta": restore_from.meta, "shards": shards})
        deadline = time.monotonic() + self.trainer.setup_timeout_s
        while True:
            try:
                attempt, planned = planned, None  # a retry checks the cluster again
                group = self._try_start(ref, attempt)
            except WorkerError as error:
                raise TrainingFailed(str(error)) from None
            except (ConfigError, GroupFailed) as error:
                # The first start: nothing to recover, say what happened; a transport failure
                # while forming the group (NCCL init, a port taken) is retried all the same.
                if not self.failures and not isinstance(error, SetupTransportFailed):
                    if isinstance(error, GroupFailed):
                        raise TrainingFailed(str(error)) from None
                    raise
                if time.monotonic() > deadline:
                    raise TrainingFailed(
                        f"could not start a new worker group within trainer.setup_timeout_s="
                        f"{self.trainer.setup_timeout_s:g} s after a failure: {error}"
                    ) from None
                time.sleep(1.0)
                continue
            self.recorder.write_workers(group)
            self.failures.recovered()
            configured = self.configured.world_size
            if group.plan.world_size < configured:
                self.recorder.message(
                    f"elastic: continuing on {group.plan.world_size} of {configured} "
                    f"workers (trainer.min_workers={self.trainer.min_workers}), same global "
                    f"batch {group.plan.global_batch}"
                )
            return group

    def _try_start(self, checkpoint_ref: Any, planned: Planned | None) -> WorkerGroup:
        """One attempt: a group planned, placed and set up, or shut down again on any error."""
        plan, scale_up = planned or self.plan()
        group = WorkerGroup(self.job, plan, self.device_type, self.slow_rank)
        kept, self.kept = self.kept, None  # the first attempt only
        try:
            group.start(
                self.resources(plan.world_size),
                checkpoint_ref,
                self.splits_ref,
                # For the configured count: a smaller group's spare is capacity to grow back with.
                spares=healing.spares_to_start(
                    self.job, self.device_type, self.configured.world_size
                ),
                scale_up=scale_up,
                kept=kept,
            )
        except BaseException:
            group.shutdown()
            raise
        return group

    def plan(self) -> Planned:
        """The configured worker count (after a failure, the most that fit, >= min_workers),
        and whether they fit only once the autoscaler has added nodes: the cluster is checked
        here, once per group start, and `WorkerGroup.start` reserves on that verdict."""
        if self.kept is not None:  # they fit: they hold their reservation
            return self.configured, False
        placement = self.job.cluster.placement.value
        scale_up: dict[int, bool] = {}  # by world size: the last check's verdict

        def check_fits(world_size: int) -> None:
            need = self.resources(world_size)
            scale_up[world_size] = reservation.check_resources(need, placement)

        growing_back, self.growing_back = self.growing_back, False
        if growing_back and elastic.fits_within(check_fits, self.trainer.workers, GROW_SETTLE_S):
            return self.configured, scale_up[self.trainer.workers]
        world_size = elastic.choose_world_size(
            self.trainer.workers, self.trainer.min_workers, check_fits, shrink=bool(self.failures)
        )
        return self.configured.on(world_size), scale_up[world_size]

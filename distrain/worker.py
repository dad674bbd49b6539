"""The worker actor: owns one device, builds its parts from the plain config, runs the loop."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import replace
from typing import Any

import ray
import torch
from hydra.utils import instantiate

from distrain import blocks, build, lm, network, shards, training_state
from distrain import device as devices
from distrain.aggregators import process_group
from distrain.aggregators.base import GradientAggregator
from distrain.config import TrainerConfig, typed
from distrain.data.base import SharedSplits
from distrain.data.batches import ShardBatches
from distrain.forked_workers import FORKED_ENV
from distrain.loop import Cadence, Position, fit
from distrain.plan import StepPlan
from distrain.records import (
    CheckpointRecord,
    EpochRecord,
    EvalRecord,
    Heartbeat,
    RankResult,
    Record,
    StandDown,
)
from distrain.reporting import PAUSE_LAG_STEPS
from distrain.simulate import SlowRank
from distrain.step import Parts

log = logging.getLogger("distrain.worker")
# Records leave in batches at most this often (epochs at once): a Ray call per logged step costs
# the worker and the sink CPU that the step needs when workers fill every core.
REPORT_EVERY_S = 0.25
SAVED_POLL_S = 0.01  # trainer.async_checkpoint=false: how often a worker asks if it is written


class Worker:
    """One rank. Receives the job and its plan as plain values (never a live module or Hydra)
    and types the job itself: a node that cannot import distrain then fails on the Worker class,
    named by the driver in one sentence, not while unpickling an argument (a traceback in the
    driver's output)."""

    def __init__(self, *job: Any) -> None:
        # `take_job`'s arguments: the actor starts on its first job. None: a worker started
        # while the driver still checks the job (early_start.py) takes it later.
        if job:
            self.take_job(*job)

    def take_job(
        self,
        rank: int,
        plan: dict[str, int],
        job: dict[str, Any],
        device_type: str,
        sink: Any,
        slow_rank: SlowRank | None = None,
    ) -> None:
        """Start on a job: when the actor is made, and again when a kept worker runs the next job
        of a sweep (distrain/warm_workers.py). What the last job built is dropped first."""
        if getattr(self, "parts", None) is not None:
            self._drop_job()
        self.sink, self.slow_rank = sink, slow_rank
        self.plan, self.job = StepPlan(**plan), typed(job)
        self.world_size = self.plan.world_size
        trainer = self.job.trainer
        self._name(rank)
        # One intra-op thread per reserved CPU, so N workers on N cores do not oversubscribe.
        torch.set_num_threads(max(1, int(trainer.cpus_per_worker)))
        network.bind_collectives(self.job.cluster.socket_ifname, ray.util.get_node_ip_address())
        self.device_type = device_type
        # CUDA is not touched until `place`: CUDA_VISIBLE_DEVICES must be set before it starts.
        self.device = devices.worker_device(device_type) if device_type == devices.CPU else None
        self.precision = trainer.precision
        self.splits: Any = None  # built (or mapped) once: a healed group's survivors keep it
        self.position = Position()  # the last completed step, also after a failed one

    def _drop_job(self) -> None:
        """Free the last job's model, optimizer and data, and its compiled code (dynamo's caches
        are keyed on code: a sweep of compiled jobs would otherwise hit its recompile limit and
        quietly run eagerly); the next job's peak memory is its own."""
        compiled, device = self.compiled, self.device
        self.parts = self.splits = None
        gc.collect()
        if compiled:
            torch._dynamo.reset()
        if device.type == devices.CUDA:
            torch.cuda.empty_cache()
        devices.reset_peak_memory(device)

    def _name(self, rank: int) -> None:
        """Take `rank` (a spare has none, -1, until it replaces a worker)."""
        self.rank = rank
        label = f"rank {rank}" if rank >= 0 else "spare"
        logging.basicConfig(level=logging.INFO, format=f"[{label}] %(message)s", force=True)

    def place(self, placement: devices.DevicePlacement | None) -> None:
        """Take this rank's device (group.py shares each node's GPU list among its workers)."""
        self.device = devices.worker_device(self.device_type, placement)
        devices.configure_math(self.device, self.precision, self.job.trainer.tf32)

    def serve_rendezvous(self) -> dict[str, Any]:
        """Rank 0's part of a rendezvous: the group's store, listening before the other ranks
        are told its address (aggregators/process_group.py)."""
        return process_group.serve(timeout_s=collective_timeout_s(self.job.trainer))

    def node(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            # Forked by the embedded Ray's fork server, torch already imported (forked_workers.py)
            "forked": FORKED_ENV in os.environ,
            "gpu_ids": devices.assigned_gpu_ids() if self.device_type == devices.CUDA else [],
            "noset": devices.noset_visible_devices(),
            "visible": os.environ.get(devices.VISIBLE_ENV),
        }

    def setup(
        self,
        rendezvous: dict[str, Any],
        checkpoint: list[Any] | None = None,
        shared: SharedSplits | None = None,
    ) -> None:
        """Join the aggregator's group and build model, data, optimizer on this device.

        `shared`: the data as the driver built it (in-memory data, mapped from this node's copy
        in the object store); None: this worker builds it from the job.

        `checkpoint` is `[ObjectRef]` of a checkpoint payload to start from (in a list, so Ray
        hands over the reference rather than fetching it for every actor up front).
        """
        aggregator = self._join(rendezvous)
        if self.splits is None:
            self.splits = build.build_splits(self.job.data) if shared is None else shared.open()
        self.parts = self._build_parts(aggregator, self.splits)
        if self.splits.task == "language_model":
            lm.add_language_model_figures(
                self.parts,
                self.splits,
                self.job.logger,
                self.job.trainer,
                device=self.device,
                lead=self.rank == 0,
            )
        self.position = Position()
        if checkpoint:
            self.position = training_state.restore(
                self.parts, ray.get(checkpoint[0]), rank=self.rank
            )

    def _join(self, rendezvous: dict[str, Any]) -> GradientAggregator:
        """The job's aggregator, connected to its peers."""
        trainer = self.job.trainer
        aggregator: GradientAggregator = instantiate(self.job.aggregator, _convert_="all")
        aggregator.connect(
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            rendezvous=rendezvous,
            timeout_s=collective_timeout_s(trainer),
        )
        # While blocked on its peers the worker still reports, naming whom it waits for.
        aggregator.on_wait = self._waiting
        aggregator.wait_beat_s = heartbeat_s(trainer)
        aggregator.precision = self.precision
        return aggregator

    def _batches(self, splits: Any) -> ShardBatches:
        """This rank's share of every global batch, on its device."""
        plan, batching = self.plan, self.job.data.batching
        return ShardBatches(
            splits,
            global_batch=plan.global_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.job.trainer.seed,
            device=self.device,
            loader=batching.loader,
            num_workers=batching.num_workers,
            # Language models that accumulate evaluate micro-batch by micro-batch: (B, T, V)
            # logits are large.
            eval_batch_size=plan.micro_batch
            if splits.task == "language_model" and plan.accumulation_steps > 1
            else None,
            shares=plan.shares(self.rank),
        )

    def _build_parts(self, aggregator: GradientAggregator, splits: Any) -> Parts:
        """Model, loss, optimizer, scheduler and batches, wrapped and built by `aggregator`."""
        job, trainer, plan = self.job, self.job.trainer, self.plan
        batches = self._batches(splits)
        torch.manual_seed(trainer.seed)  # the same initial parameters on every rank
        model = build.build_model(job.model, splits).to(self.device)
        self.compiled = blocks.prepare(model, aggregator, trainer)
        # Wrapped before the optimizer is built: FSDP replaces the parameters with their shards.
        train_model = aggregator.wrap(model)
        # The aggregator builds it: ZeRO sharding, or a server-side step, are its business.
        optimizer = aggregator.build_optimizer(
            build.optimizer_factory(job.optimizer, global_batch=plan.global_batch),
            build.param_groups(job.optimizer, model.parameters()),
            shard=trainer.shard_optimizer,
        )
        scheduler = build.build_scheduler(
            job.scheduler,
            optimizer,
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=plan.total_steps,
        )
        return Parts(
            model=model,
            train_model=train_model,
            loss_fn=build.build_loss(job.loss, splits.task).to(self.device),
            optimizer=optimizer,
            scheduler=scheduler,
            aggregator=aggregator,
            batches=batches,
            autocast=devices.autocast_factory(self.device.type, self.precision),
            scaler=devices.grad_scaler(self.device.type, self.precision),
            micro_batch_size=plan.micro_batch,
            max_grad_norm=trainer.max_grad_norm,
            task=splits.task,
            num_outputs=splits.num_outputs,
            shares=plan.shares(self.rank),
            seed=trainer.seed,
        )

    def _at_boundary(self, position: Position, *, epoch_end: bool, final: bool) -> bool:
        stop, checkpoint = ray.get(self.sink.decide.remote(position.step, final))
        if checkpoint:
            started = time.perf_counter()
            header, tensors = training_state.capture(
                self.parts, position, rank=self.rank, world_size=self.world_size
            )
            # The copy the step waits for (into the object store); the write is the driver's.
            share = ray.put(shards.to_wire(tensors))
            self._report(CheckpointRecord(position.step, epoch_end, header, [share]))
            self._checkpoint_blocking_s += time.perf_counter() - started
            if not self.job.trainer.async_checkpoint:
                # Synchronous: wait until the checkpoint is on disk. At an epoch end the driver
                # writes it once the epoch's record is in, so the wait comes after sending it.
                self._unsaved_step = position.step
                if not epoch_end:
                    self._wait_saved()
        return stop

    def _pause_here(self, position: Position) -> bool:
        """Whether the group stops after this step to grow back. Asked PAUSE_LAG_STEPS steps
        ahead, so the answer is in when the step comes: no round trip to the sink a step."""
        ahead = position.step + PAUSE_LAG_STEPS
        self._pauses[ahead] = self.sink.pause_at.remote(ahead)
        ref = self._pauses.pop(position.step, None)
        # Steps that were checkpoint boundaries were decided there: their answers are not read.
        self._pauses = {step: r for step, r in self._pauses.items() if step > position.step}
        return ref is not None and ray.get(ref)

    def _wait_saved(self) -> None:
        """trainer.async_checkpoint=false: block until the driver has written the checkpoint."""
        started = time.perf_counter()
        while ray.get(self.sink.saved_step.remote()) < self._unsaved_step:
            time.sleep(SAVED_POLL_S)
        self._unsaved_step = -1
        self._checkpoint_blocking_s += time.perf_counter() - started

    def fit(self, pause_at_any_step: bool = False) -> RankResult:
        """Train to the end, or until the group agrees to stop: at a checkpoint boundary, or
        (`pause_at_any_step`, a group that grows back in place) after any step."""
        trainer, logger = self.job.trainer, self.job.logger
        self._outbox: list[Record] = []
        self._checkpoint_blocking_s, self._unsaved_step = 0.0, -1
        self._pauses: dict[int, Any] = {}  # step -> the sink's answer whether to stop after it
        self._next_report_s = time.monotonic()
        self.parts.aggregator.fit_started_s = time.perf_counter()
        cadence = Cadence(
            log_every_n_steps=logger.log_every_n_steps,
            checkpoint_every_n_steps=trainer.checkpoint_every_n_steps,
            heartbeat_s=heartbeat_s(trainer),
            nan_policy=trainer.nan_policy,
            # Histograms are the same on every rank after aggregation: rank 0 sends them.
            histogram_every_n_steps=logger.histogram_every_n_steps if self.rank == 0 else 0,
            eval_every_n_steps=trainer.eval_every_n_steps,
            slow_step_s=self.slow_rank.delay_s(self.rank) if self.slow_rank else 0.0,
            profile_steps=logger.profile_steps,
            profile_after_step=logger.profile_after_step,
        )
        stopped = fit(
            self.parts,
            plan=self.plan,
            cadence=cadence,
            pos=self.position,
            at_boundary=self._at_boundary,
            report=self._report,
            at_step=self._pause_here if pause_at_any_step else None,
        )
        position = self.position
        self._report(None)
        ray.get(self.sink.flush.remote())  # every record of this rank is in the sink now
        model_state = self.parts.aggregator.model_state_dict(self.parts.model)  # all ranks
        self.parts.aggregator.close()
        stats = self.parts.aggregator.stats()
        # Seconds the steps waited for checkpoints: the capture to host memory, and with
        # trainer.async_checkpoint=false the write too.
        stats["checkpoint_blocking_s"] = self._checkpoint_blocking_s
        if self.compiled:  # torch.compile ran during the first step
            stats["compile_s"] = stats["first_step_extra_s"]
        return RankResult(
            rank=self.rank,
            steps=position.step,
            stopped=stopped,
            skipped_steps=position.skipped_steps,
            aggregator=stats,
            state_dict=devices.to_cpu(model_state) if self.rank == 0 else None,
        )

    # Healing (distrain/healing.py): the survivors of a failed step keep their processes.

    def stand_down(self) -> StandDown:
        """After a peer failed: leave the broken process group (and shared-memory segment) and
        say where this rank stands: its last completed step and its share of the epoch's loss."""
        self.position.settle()
        if getattr(self, "_outbox", None):  # what it had not sent yet, for the last drain
            self._report(None)
            ray.get(self.sink.flush.remote(), timeout=5.0)
        parts = getattr(self, "parts", None)
        if parts is not None:
            parts.aggregator.close()
        position = self.position
        return StandDown(self.rank, position.step, position.epoch_loss_sum, position.epoch_batches)

    def snapshot(self, epoch_loss_sum: float, epoch_batches: int) -> CheckpointRecord:
        """This replica's whole training state at its last completed step, as the checkpoint
        record of a world of one: the header inline, the tensors in the object store. The
        epoch's loss so far is the survivors' (the failed ranks' shares are gone)."""
        position = Position(
            **{
                **self.position.plain(),
                "epoch_loss_sum": epoch_loss_sum,
                "epoch_batches": epoch_batches,
            }
        )
        header, tensors = training_state.capture(self.parts, position, rank=0, world_size=1)
        share = ray.put(shards.to_wire(tensors))
        return CheckpointRecord(
            position.step, epoch_end=False, header=header, share=[share], rank=0
        )

    def rejoin(
        self,
        rank: int,
        sink: Any,
        rendezvous: dict[str, Any],
        state: list[Any],
        shared: SharedSplits | None,
        plan: dict[str, int],
    ) -> None:
        """Join a healed or grown group as `rank` (a spare takes its rank here): a new process
        group, the parts rebuilt around the data this process already holds, the state from
        `state`. `plan`: the group's (a spare, or a worker that grows a group back, was made
        for another)."""
        self.plan = StepPlan(**plan)
        self.world_size = self.plan.world_size
        self._name(rank)
        self.sink = sink
        self.setup(rendezvous, state, shared)

    def warm(self, shared: SharedSplits | None) -> dict[str, Any]:
        """A spare (CPU workers: group.py) gets ready to replace a worker: the data mapped, and
        `preload`ed."""
        self.preload()
        if shared is not None:
            self.splits = shared.open()
        return self.node()

    def preload(self) -> None:
        """Import now what DDP's constructor and the first optimizer step import
        (torch._dynamo, ~1 s of CPU), not on the way to the first step: for a spare, and for a
        worker started before its job (the driver still checking it)."""
        import torch._dynamo  # noqa: F401

    def _waiting(self, ranks: list[int]) -> None:
        self._report(Heartbeat(waiting_for=ranks))

    def _report(self, record: Record | None) -> None:
        """Queue a record; send the queue if it is due. `None` sends what is queued.

        Batched (at most every REPORT_EVERY_S) so that logging every step costs one actor call
        per quarter second, not one per record; epochs, evaluations and checkpoints go at once.
        """
        if record is not None:
            self._outbox.append(replace(record, rank=self.rank))
        now = time.monotonic()
        due = record is None or isinstance(record, EpochRecord | EvalRecord | CheckpointRecord)
        due = due or now >= self._next_report_s
        if due and self._outbox:
            self.sink.push_many.remote(self._outbox)
            self._outbox, self._next_report_s = [], now + REPORT_EVERY_S
        if isinstance(record, EpochRecord) and self._unsaved_step >= 0:
            self._wait_saved()  # the epoch-end checkpoint, synchronous


def collective_timeout_s(trainer: TrainerConfig) -> float:
    """Twice the driver's hang timeout: the driver names the silent rank first, and a
    collective stuck on a dead peer still raises instead of waiting 30 minutes."""
    return 2 * trainer.step_timeout_s


def heartbeat_s(trainer: TrainerConfig) -> float:
    """Report at least this often, so the driver can tell a slow step from a hung worker."""
    return min(5.0, trainer.step_timeout_s / 5)

"""One group of worker actors: reserved together, started together, torn down together.

A failure either heals the group (`replace`: the survivors stay, a spare or a new actor takes each
failed rank; or `shrink`: the survivors train on as a smaller group while new actors start, and
`grow` adds them; distrain/healing.py) or ends it, and the driver's supervisor starts a new one from
the last checkpoint. A group an elastic run shrank grows back the same way (`grow`: its workers
stay, new actors take the missing ranks in the reservation that showed they fit). Keeping the
group's lifecycle in one place makes "no orphan actors" a property of `shutdown()`, called from a
`finally`: a healed or grown group takes its actors, spares and reservations with it, and the old
one keeps only what failed; a finished group that `keep`s its workers for the next job hands them
to distrain/warm_workers.py, which owns them from then on.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray
from hydra.utils import get_object
from ray.util.placement_group import remove_placement_group

from distrain import actors, reservation, standby, warm_workers
from distrain import device as devices
from distrain.aggregators.base import GradientAggregator
from distrain.awaiting import awaited
from distrain.config import Config, plain
from distrain.errors import GroupFailed
from distrain.plan import StepPlan
from distrain.records import Record
from distrain.simulate import SlowRank
from distrain.standby import Bundle, Spare


class WorkerGroup:
    def __init__(
        self, job: Config, plan: StepPlan, device_type: str, slow_rank: SlowRank | None = None
    ) -> None:
        self.job, self.plan, self.slow_rank = job, plan, slow_rank
        self.world_size = plan.world_size
        self.device_type = device_type
        self.workers: list[Any] = []
        self.nodes: list[dict[str, Any]] = []
        self.sink: Any = None
        self.sink_ip = "?"  # the sink's node, once it has answered
        self.placement_group: Any = None
        self.grown_into: list[Any] = []  # reservations of ranks a grow back adds (`start_joining`)
        self.rendezvous: dict[str, Any] = {}
        self.startup_s: dict[str, float] = {}
        self.started = "with the group"  # or how its workers came ready (KeptWorkers.origin)
        self.grow_probe: Any = None  # elastic.GrowProbe of a group smaller than configured
        self.need: reservation.WorkerResources | None = None
        self.splits_ref: Any = None
        self.bundles: list[Bundle | None] = []  # each rank's (None: a spare placed outside)
        self.spares: list[Spare] = []  # trainer.spare_workers
        self.joining: list[Spare] = []  # the workers a grow back adds, started ahead of it
        self.fit_refs: dict[Any, int] = {}
        self.taken_from_spares: list[int] = []  # ranks a spare took when this group healed
        self.group_id = uuid.uuid4().hex[:8]
        self._actors_made = 0

    def start(
        self,
        need: reservation.WorkerResources,
        checkpoint_ref: Any | None,
        splits_ref: Any | None = None,
        spares: int = 0,
        *,
        scale_up: bool = False,
        kept: warm_workers.KeptWorkers | None = None,
    ) -> None:
        """Reserve, start the actors, rendezvous, build; bounded by trainer.setup_timeout_s.

        `splits_ref`: the driver's in-memory data in the object store (None: workers build it).
        `spares`: warm spares to start once the group is set up (they warm up in the background).
        `scale_up`: the checked verdict that `need` fits only once the autoscaler adds nodes.
        `kept`: the last job's workers, sink and reservation, to run this job on (warm_workers).
        """
        trainer = self.job.trainer
        self.need, self.splits_ref = need, splits_ref
        started = time.perf_counter()
        if kept is None:
            self.placement_group = reservation.place(need, self.job.cluster, scale_up=scale_up)
            self.sink = actors.start_sink(trainer.checkpoint_min_interval_s)
            self.bundles = [(self.placement_group, rank) for rank in self.ranks]
            made = [self._actor(rank, bundle) for rank, bundle in enumerate(self.bundles)]
            self.workers, self.names = [w for w, _ in made], [n for _, n in made]
            taken, sink_up = [], [self.sink.node_ip.remote()]
        else:
            taken, sink_up = self._take_kept(kept)
            self.started = kept.origin
        timeout_s = trainer.setup_timeout_s
        self.nodes = awaited(
            [*taken, *(w.node.remote() for w in self.workers)], timeout_s, "start"
        )[len(taken) :]
        awaited(
            [w.place.remote(p) for w, p in zip(self.workers, self._placements())],
            timeout_s,
            "take its device",
        )
        actors_s = time.perf_counter() - started
        aggregator: type[GradientAggregator] = get_object(self.job.aggregator["_target_"])
        self.rendezvous = aggregator.rendezvous(self.workers, self.job.aggregator)
        checkpoint = [checkpoint_ref] if checkpoint_ref is not None else None
        # The sink answers before training starts: one slow to come up fails the start (which
        # is retried), not the first drain of a running group (which would count a restart).
        # Awaited here, not with the workers: it starts while they take their devices and set up.
        setups = [w.setup.remote(self.rendezvous, checkpoint, splits_ref) for w in self.workers]
        *_, self.sink_ip = awaited([*setups, *sink_up], timeout_s, "set up")
        # Where start-up time goes: actor processes starting, then building + rendezvous.
        self.startup_s = {"actors": actors_s, "setup": time.perf_counter() - started - actors_s}
        for _ in range(spares):
            self._add_spare(bundle=None)

    def _take_kept(self, kept: warm_workers.KeptWorkers) -> tuple[list[Any], list[Any]]:
        """Run on the last job's workers, sink and reservation: each worker drops that job and
        takes this one, and so does the sink (the workers' refs of that, and the sink's, which
        answers with its node's address last, to wait on)."""
        self.placement_group, self.sink = kept.placement_group, kept.sink
        self.bundles = [(self.placement_group, rank) for rank in self.ranks]
        self.workers, self.names = kept.workers, kept.names
        self.group_id, self._actors_made = kept.group_id, kept.actors_made
        interval_s = self.job.trainer.checkpoint_min_interval_s
        taken = [w.take_job.remote(*self._job_of(rank)) for rank, w in enumerate(self.workers)]
        return taken, [self.sink.reset.remote(interval_s), self.sink.node_ip.remote()]

    def keep(self, shape: warm_workers.Shape) -> None:
        """Hand the workers, sink and reservation to warm_workers for the next job of `shape`
        (`shutdown` frees the rest), unless a spare took a rank: it sits outside the bundles."""
        if self.bundles != [(self.placement_group, rank) for rank in self.ranks] or self.grown_into:
            return
        warm_workers.keep(
            warm_workers.KeptWorkers(
                shape,
                self.placement_group,
                self.workers,
                self.names,
                self.sink,
                self.group_id,
                self._actors_made,
            )
        )
        self.workers, self.sink, self.placement_group = [], None, None

    @property
    def ranks(self) -> range:
        return range(self.world_size)

    def _job_of(self, rank: int) -> tuple[Any, ...]:
        """What a worker for `rank` is given: `Worker.__init__`'s and `take_job`'s arguments."""
        return rank, asdict(self.plan), plain(self.job), self.device_type, self.sink, self.slow_rank

    def _actor(self, rank: int, bundle: Bundle | None) -> tuple[Any, str]:
        """A new worker actor for `rank` (-1: a spare) in `bundle`, or (None) outside the group's
        reservations, spread over the cluster's nodes; and its name."""
        assert self.need is not None
        self._actors_made += 1
        label = f"rank{rank}" if rank >= 0 else "spare"
        name = f"distrain-{self.group_id}-{label}-{self._actors_made}"
        placement_group, index = bundle if bundle is not None else (None, None)
        handle = actors.start_worker(name, self.need, placement_group, index, *self._job_of(rank))
        return handle, name

    def _add_spare(self, bundle: Bundle | None) -> None:
        """Start a spare in the background: torch imported, the data mapped, its device taken."""
        self.spares.append(self._standby(bundle))

    def _standby(self, bundle: Bundle | None) -> Spare:
        """A worker with no rank yet, warming up in the background (`Worker.warm`)."""
        handle, name = self._actor(-1, bundle)
        warm = handle.warm.remote(self.splits_ref)
        return Spare(handle, name, bundle, warm, started_s=time.monotonic())

    def start_joining(self, reserved: Any, count: int) -> None:
        """Start the `count` workers a grow back adds, in the bundles of `reserved` (the placed
        elastic.GrowProbe: Ray put them where the placement rule allows); they warm up while
        this group trains on, and `grow` takes them once `standby.all_warm`."""
        self.grown_into.append(reserved)  # freed with the group that ends up holding it
        self.joining = [self._standby((reserved, index)) for index in range(count)]

    def join_with_spares(self, count: int) -> bool:
        """Make `count` ready warm spares the workers a grow back adds, if that many are ready
        (`standby.newly_ready` says which): then no new worker needs to start."""
        ready = [spare for spare in self.spares if spare.ready_s is not None][:count]
        if len(ready) < count:
            return False
        self.spares = [spare for spare in self.spares if spare not in ready]
        self.joining = ready
        return True

    def replace(self, failed: set[int], state_ref: Any) -> WorkerGroup:
        """The same ranks again: the survivors kept, each failed rank taken by a ready spare (or
        a new actor in its bundle), every rank rejoining a new process group from `state_ref`
        (a one-rank checkpoint payload). This group keeps only the failed actors, its sink and
        its grow probe, for `shutdown`; a used spare is replaced in the background.
        """
        survivors, self.workers = self.workers, [self.workers[rank] for rank in sorted(failed)]
        return self._successor(
            self.plan, survivors, lambda healed: healed._take_ranks(failed), state_ref
        )

    def shrink(self, failed: set[int], plan: StepPlan, state_ref: Any) -> WorkerGroup:
        """The survivors training on as a group of `plan` (fewer workers, the same global batch,
        each standing for whole configured ranks) while new workers start in the failed ranks'
        bundles; `grow` takes them back to the configured count once `standby.all_warm`. Survivors
        beyond `plan`'s count wait among the joining. This group keeps only the failed actors
        and its grow probe, for `shutdown`."""
        survivors = [rank for rank in self.ranks if rank not in failed]
        training, waiting = survivors[: plan.world_size], survivors[plan.world_size :]
        freed = [self.bundles[rank] for rank in sorted(failed)]
        standing_by = [
            Spare.ready_now(self.workers[r], self.names[r], self.bundles[r], self.nodes[r])
            for r in waiting
        ]
        workers = [self.workers[rank] for rank in training]
        self.names = [self.names[rank] for rank in training]
        self.bundles = [self.bundles[rank] for rank in training]
        self.nodes = [{**self.nodes[old], "rank": new} for new, old in enumerate(training)]
        self.workers = [self.workers[rank] for rank in sorted(failed)]

        def take(shrunk: WorkerGroup) -> None:
            shrunk.joining = [*(shrunk._standby(bundle) for bundle in freed), *standing_by]

        return self._successor(plan, workers, take, state_ref)

    def grow(self, plan: StepPlan, state_ref: Any) -> WorkerGroup:
        """Back to `plan`'s worker count: this group's workers keep their ranks, the workers
        `start_joining` started (or the spares `join_with_spares` took) take the others, and
        every rank joins a new process group from `state_ref`. This group keeps only its sink,
        for `shutdown`; a spare used is replaced in the background."""
        added = list(range(self.world_size, plan.world_size))
        joining, self.joining = self.joining, []
        for joiner in joining:
            self.names.append(joiner.name)
            self.bundles.append(joiner.bundle)
            self.nodes.append({})
        workers, self.workers = [*self.workers, *(joiner.actor for joiner in joining)], []
        used_spares = sum(joiner.bundle is None for joiner in joining)  # spares sit outside

        def take(grown: WorkerGroup) -> None:
            grown._started(added)
            for _ in range(used_spares):
                grown._add_spare(bundle=None)

        return self._successor(plan, workers, take, state_ref)

    def _successor(
        self,
        plan: StepPlan,
        workers: list[Any],
        take: Callable[[WorkerGroup], None],
        state_ref: Any,
    ) -> WorkerGroup:
        """A group of `plan` on `workers` (kept processes) and the reservations, spares and
        names of this one, whose missing ranks `take` fills; every rank rejoins from
        `state_ref`. On any error it is shut down, the kept workers with it."""
        group = WorkerGroup(self.job, plan, self.device_type, self.slow_rank)
        assert self.need is not None
        group.need = dataclasses.replace(self.need, workers=plan.world_size)
        group.splits_ref, group.started = self.splits_ref, self.started
        group.group_id, group._actors_made = self.group_id, self._actors_made
        group.placement_group, self.placement_group = self.placement_group, None
        group.grown_into, self.grown_into = self.grown_into, []
        group.spares, self.spares = self.spares, []
        group.workers, group.names = list(workers), list(self.names)
        group.nodes, group.bundles = list(self.nodes), list(self.bundles)
        try:
            group.sink = actors.start_sink(self.job.trainer.checkpoint_min_interval_s)
            started = time.perf_counter()
            take(group)
            actors_s = time.perf_counter() - started
            aggregator: type[GradientAggregator] = get_object(self.job.aggregator["_target_"])
            group.rendezvous = aggregator.rendezvous(group.workers, self.job.aggregator)
            # Every rank takes the plan: spares were made for the group of their time.
            args = group.sink, group.rendezvous, [state_ref], self.splits_ref, asdict(plan)
            awaited(
                [w.rejoin.remote(rank, *args) for rank, w in enumerate(group.workers)],
                self.job.trainer.setup_timeout_s,
                "rejoin",
            )
            # As `start` records: the new actors taking their places, then every rank rejoining.
            setup_s = time.perf_counter() - started - actors_s
            group.startup_s = {"actors": actors_s, "setup": setup_s}
        except BaseException:
            group.shutdown()  # the kept workers too: the caller starts from a checkpoint
            raise
        return group

    def _take_ranks(self, ranks: set[int]) -> None:
        """Fill `ranks` (their actors gone): ready spares first, then new actors in the ranks'
        bundles; a bundle a spare made free gets a new spare."""
        standby.newly_ready(self.spares)  # the ones ready by now, failed ones dropped
        ready = [spare for spare in self.spares if spare.ready_s is not None]
        fresh = []
        for rank in sorted(ranks):
            spare = ready.pop(0) if ready else None
            freed = self.bundles[rank]
            if spare is not None:
                self.spares.remove(spare)
                handle, name, bundle = spare.actor, spare.name, spare.bundle
                self.nodes[rank] = {**spare.node, "rank": rank}
                self.taken_from_spares.append(rank)
                self._add_spare(freed)
            else:
                bundle = freed
                handle, name = self._actor(rank, bundle)
                fresh.append(rank)
            self.workers[rank], self.names[rank], self.bundles[rank] = handle, name, bundle
        self._started(fresh)

    def _started(self, ranks: list[int]) -> None:
        """The new actors of `ranks` up, their nodes known, their devices taken."""
        if not ranks:
            return
        timeout_s = self.job.trainer.setup_timeout_s
        nodes = awaited([self.workers[r].node.remote() for r in ranks], timeout_s, "start")
        for rank, node in zip(ranks, nodes):
            self.nodes[rank] = {**node, "rank": rank}  # a joining worker had none yet
        placements = self._placements()
        awaited(
            [self.workers[r].place.remote(placements[r]) for r in ranks],
            timeout_s,
            "take its device",
        )

    def _placements(self) -> list[devices.DevicePlacement | None]:
        """Each rank's device: on GPUs, every worker of a node sees the node's assigned GPUs."""
        if self.device_type != devices.CUDA:
            return [None] * self.world_size
        ids = [(node["node_id"], node["gpu_ids"]) for node in self.nodes]
        try:
            return list(
                devices.share_visible_devices(
                    ids,
                    noset=any(node["noset"] for node in self.nodes),
                    process_visible=[node["visible"] for node in self.nodes],
                )
            )
        except ValueError as error:  # Ray reserved no GPU for a worker: its accounting is off
            raise GroupFailed(str(error)) from None

    def describe(self) -> list[dict[str, Any]]:
        """Rank, node, pid and actor name of every worker: written to the run dir's workers.json."""
        return [{**node, "actor": name} for node, name in zip(self.nodes, self.names)]

    def drain(self) -> list[Record]:
        # Bounded like a step: a sink that stops answering (its actor died with the driver's
        # node still up, a Ray client cut off from its server) is not waited on for the minute
        # Ray takes to declare a node dead.
        timeout_s = self.job.trainer.step_timeout_s
        try:
            return ray.get(self.sink.drain.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise GroupFailed(
                f"the metrics sink (on node {self.sink_ip}) did not answer within "
                f"trainer.step_timeout_s={timeout_s:g} s (its node unreachable?)"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise GroupFailed(f"the metrics sink died: {error}") from None

    def fit(self, pause_at_any_step: bool = False) -> dict[Any, int]:
        """Start training on every rank; returns {ObjectRef: rank}. `pause_at_any_step`: the
        ranks ask after every step whether to stop there (a shrunk group to grow in place)."""
        self.fit_refs = {
            w.fit.remote(pause_at_any_step): rank for rank, w in enumerate(self.workers)
        }
        return self.fit_refs

    def where(self, rank: int) -> str:
        node = self.nodes[rank] if rank < len(self.nodes) else {}
        return f"rank {rank} (node {node.get('node_ip', '?')}, pid {node.get('pid', '?')})"

    def shutdown(self) -> None:
        """Kill every actor of the group and free its reservation; safe to call twice."""
        aggregator_cls = get_object(self.job.aggregator["_target_"])
        spares = [standby.actor for standby in [*self.spares, *self.joining]]
        for handle in [*self.workers, *spares, self.sink, *aggregator_cls.actors(self.rendezvous)]:
            if handle is not None:
                ray.kill(handle)
        for reserved in [self.placement_group, *self.grown_into]:
            if reserved is not None:
                remove_placement_group(reserved)
        if self.grow_probe is not None:
            self.grow_probe.close()
        self.workers, self.sink, self.placement_group, self.spares = [], None, None, []
        self.grown_into, self.joining = [], []

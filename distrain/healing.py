"""Healing a worker group in place: the survivors of a failure keep their processes.

Restarting every worker from the last checkpoint costs a whole start-up (new processes, torch
imported again, the data built) and the steps since that checkpoint. Here the survivors stay.
Their broken step is abandoned: a dead peer breaks the gradient all-reduce inside backward,
before the optimizer steps, so each survivor holds the state of its last completed step, a
commit that costs nothing (Horovod Elastic copies its state at every commit instead). The failed
ranks are killed and replaced, by a warm spare (`trainer.spare_workers`) or a new actor in their
bundle, and every rank rebuilds its parts around a new process group from the most advanced
survivor's state, handed over through Ray's object store: no checkpoint is read. Random streams
belong to configured ranks, seeded from (rank, step) right before each draw (distrain/streams.py),
so a replacement draws what the failed rank would have drawn, and the run ends bitwise equal to
an uninterrupted one.

Without a ready spare for every failed rank the survivors need not wait for the new workers to
start (`trainer.train_while_replacing`): they train on at once as a smaller group with the same
global batch (`trains_on`, `WorkerGroup.shrink`), each standing for whole configured ranks and
their streams, while the new workers start as the joining ones of a grow back.

An elastic group that grows back takes the same path (`grow`): its workers stay, new ones take
the state of one of them.

Healing applies to CPU workers (gloo or shared memory) where every rank holds the whole state
after each step (`heals_in_place`: DDP all-reduce without ZeRO or PowerSGD) and the failed ranks'
nodes are still up; otherwise, or if healing itself fails, the supervisor restarts from the last
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from hydra.utils import get_object

from distrain import device as devices
from distrain import hangs, standby
from distrain.config import Config
from distrain.errors import GroupFailed
from distrain.group import WorkerGroup
from distrain.plan import StepPlan
from distrain.records import StandDown

log = logging.getLogger("distrain")
NEVER_WRITTEN_STEP = 2**62  # "every checkpoint is written", to release ranks waiting for one


@dataclass
class Healed:
    group: WorkerGroup  # the same ranks, the failed ones replaced
    from_step: int  # the survivors' last completed step (the most advanced one's)
    source_rank: int  # whose state every rank took
    survivors: list[int]
    from_spares: list[int]  # the failed ranks a warm spare took (the others: new actors)
    phases_s: dict[str, float]  # where the healing time went
    replaced: list[int]
    # Workers the survivors train on while the replacements start (`trains_on`; None: they
    # waited for them, or a spare took each failed rank).
    training_on: int | None = None

    def record(self) -> dict[str, Any]:
        """The heal as metrics.json's failure entry holds it."""
        return {
            "from_step": self.from_step,
            "source_rank": self.source_rank,
            "survivors": self.survivors,
            "replaced": self.replaced,
            "from_spares": self.from_spares,
            "phases_s": self.phases_s,
            "training_on": self.training_on,
        }

    def __str__(self) -> str:
        if self.training_on is not None:
            return (
                f"rank(s) {self.replaced} being replaced by new workers while the survivors train "
                f"on as {self.training_on} worker(s) (the same global batch) from step "
                f"{self.from_step}, held in memory by rank {self.source_rank} (no checkpoint "
                "read); the group grows back once the new workers are ready"
            )
        replaced = ", ".join(
            f"rank {rank} by {'a warm spare' if rank in self.from_spares else 'a new worker'}"
            for rank in self.replaced
        )
        return (
            f"{replaced}; the other workers kept their processes and continue from step "
            f"{self.from_step}, held in memory by rank {self.source_rank} (no checkpoint read)"
        )


def never(job: Config, device_type: str, world_size: int) -> str | None:
    """Why no failure of this job's groups can heal in place (None: some can): then neither
    healing nor warm spares are tried."""
    aggregator = get_object(job.aggregator["_target_"])
    if not job.trainer.heal:
        return "trainer.heal=false"
    if world_size < 2:
        return "one worker: no survivor"
    if not aggregator.heals_in_place(job.aggregator, shard_optimizer=job.trainer.shard_optimizer):
        return f"the ranks of aggregator {job.aggregator['_target_']} do not each hold the state"
    if device_type == devices.CUDA:
        # An NCCL collective whose peer died does not fail: it waits for the watchdog, which then
        # ends the survivor's process too. Abandoning it needs the communicator aborted from
        # another thread of the survivor, which is not built yet.
        return "healing in place is not built for CUDA workers yet"
    return None


def spares_to_start(job: Config, device_type: str, world_size: int) -> int:
    """trainer.spare_workers, unless no failure could use a spare (then none is started)."""
    wanted = job.trainer.spare_workers
    reason = never(job, device_type, world_size) if wanted else None
    if reason is not None:
        log.warning(
            "trainer.spare_workers=%d: none started, nothing heals in place (%s)", wanted, reason
        )
        return 0
    return wanted


def why_not(job: Config, group: WorkerGroup, failure: GroupFailed) -> str | None:
    """Why `failure` cannot be healed in place (None: it can)."""
    reason = never(job, group.device_type, group.world_size)
    if reason is not None:
        return reason
    failed = failure.failed_ranks
    if not failed or failure.unreachable_nodes:
        return "the failure is not one of known ranks on reachable nodes"
    if len(failed) >= group.world_size:
        return "no worker survived"
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    nodes = {group.nodes[rank]["node_id"] for rank in failed}
    if nodes - alive:
        return "a failed rank's node is gone"
    # A node lost moments ago still counts as alive: a replacement placed there would never
    # start. The driver's own node needs no asking.
    remote = nodes - {ray.get_runtime_context().get_node_id()}
    if remote and hangs.unreachable(remote):
        return "a failed rank's node does not answer"
    return None


def trains_on(group: WorkerGroup, survivors: int, spares_ready: int, failed: int) -> int | None:
    """How many workers the survivors train on while the failed ranks' replacements start
    (`trainer.train_while_replacing`), or None: a ready spare takes every failed rank, or the
    group is already smaller than configured (an elastic run that lost workers heals as it
    stands). The most survivors that divide the configured count: each then stands for whole
    configured ranks (the same global batch, the same random streams, `StepPlan.shares`)."""
    plan = group.plan
    if spares_ready >= failed or plan.world_size != plan.configured_workers:
        return None
    return next(w for w in range(survivors, 0, -1) if plan.configured_workers % w == 0)


def heal(
    group: WorkerGroup,
    failed: frozenset[int],
    *,
    timeout_s: float,
    assemble: Callable[[list[dict[str, Any]], bool], dict[str, Any]],
    train_while_replacing: bool,
) -> Healed:
    """Replace the `failed` ranks of `group`; raises GroupFailed if the survivors cannot heal
    within `timeout_s` (the caller then restarts from a checkpoint). `assemble` turns checkpoint
    records into a checkpoint's metadata (CheckpointWriter.assemble). `train_while_replacing`:
    unless ready spares take every failed rank, the survivors train on as a smaller group
    (`trains_on`) while new workers start, and the group grows back once they are ready."""
    clock = _Phases()
    here = ray.get_runtime_context().get_node_id()
    for rank in failed:  # a frozen rank stays frozen: only its end frees the survivors
        node = group.nodes[rank]
        if node["node_id"] == here and _is_worker_process(node["pid"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(node["pid"], signal.SIGKILL)  # at once: Ray asks a frozen one to exit
        ray.kill(group.workers[rank])
    survivors = [rank for rank in range(group.world_size) if rank not in failed]
    # Under trainer.async_checkpoint=false a survivor may be waiting for a checkpoint that the
    # failed rank's share will never complete: release it (it then meets the dead peer).
    group.sink.saved.remote(NEVER_WRITTEN_STEP)
    try:
        # Each survivor's `fit` ends once its collective sees the peer gone (a closed socket,
        # a process that exited); then it leaves the broken process group.
        running = [ref for ref, rank in group.fit_refs.items() if rank in survivors]
        _, stuck = ray.wait(running, num_returns=len(running), timeout=timeout_s)
        if stuck:
            stuck_ranks = sorted(group.fit_refs[ref] for ref in stuck)
            raise GroupFailed(f"rank(s) {stuck_ranks} did not leave the failed step")
        clock.lap("survivors_stopped_s")
        source, state = _capture(group, survivors, timeout_s, assemble)
        clock.lap("state_captured_s")
        standby.newly_ready(group.spares)
        ready = len(standby.ready_s(group.spares))
        smaller = trains_on(group, len(survivors), ready, len(failed))
        smaller = smaller if train_while_replacing else None
        if smaller is not None:
            healed = group.shrink(set(failed), group.plan.on(smaller), state)
        else:
            healed = group.replace(set(failed), state)
    except GroupFailed:
        raise
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
        raise GroupFailed(f"{type(error).__name__}: {error}") from None
    return Healed(
        group=healed,
        from_step=source.step,
        source_rank=source.rank,
        survivors=survivors,
        from_spares=healed.taken_from_spares,
        replaced=sorted(failed),
        phases_s={
            **clock.phases,
            # A new actor's process start and imports, or nothing for a ready spare (or for new
            # workers that start while the survivors train on: their start is not waited for).
            "replacements_started_s": round(healed.startup_s["actors"], 3),
            "rejoined_s": round(clock.lap("") - healed.startup_s["actors"], 3),
        },
        training_on=smaller,
    )


@dataclass
class Grown:
    group: WorkerGroup  # the configured count again: the workers kept, new ones added
    step: int  # where it paused, the state every rank took
    from_workers: int
    phases_s: dict[str, float]
    new_workers_ready_s: float  # their start-up, while the group trained on

    def record(self) -> dict[str, Any]:
        """The grow back as metrics.json's `grow_backs` entry holds it."""
        return {
            "step": self.step,
            "from_workers": self.from_workers,
            "in_place": True,
            "phases_s": self.phases_s,
            "new_workers_ready_s": self.new_workers_ready_s,
        }


def grow(
    group: WorkerGroup,
    plan: StepPlan,
    *,
    timeout_s: float,
    assemble: Callable[[list[dict[str, Any]], bool], dict[str, Any]],
) -> Grown:
    """`group`, which paused after a step, back to `plan`'s worker count: its workers keep
    their processes, the new ones it started ahead (`WorkerGroup.start_joining`) join, and
    every rank takes rank 0's state from memory (no checkpoint is read). Raises GroupFailed if
    that fails (the caller then grows back from the last checkpoint)."""
    clock = _Phases()
    new_workers_ready_s = max(joiner.ready_s or 0.0 for joiner in group.joining)
    try:
        source, state = _capture(group, list(group.ranks), timeout_s, assemble)
        clock.lap("state_captured_s")
        grown = group.grow(plan, state)
    except GroupFailed:
        raise
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
        raise GroupFailed(f"{type(error).__name__}: {error}") from None
    return Grown(
        grown,
        step=source.step,
        from_workers=group.world_size,
        phases_s={
            **clock.phases,
            # The new workers' places taken (they started while the group trained on).
            "workers_started_s": round(grown.startup_s["actors"], 3),
            "rejoined_s": round(clock.lap("") - grown.startup_s["actors"], 3),
        },
        new_workers_ready_s=new_workers_ready_s,
    )


def _capture(
    group: WorkerGroup,
    ranks: list[int],
    timeout_s: float,
    assemble: Callable[[list[dict[str, Any]], bool], dict[str, Any]],
) -> tuple[StandDown, Any]:
    """`ranks` (out of training) leave their process group; the most advanced one's whole
    state goes to the object store as a one-rank checkpoint payload: who, and its reference."""
    states = ray.get([group.workers[rank].stand_down.remote() for rank in ranks], timeout=timeout_s)
    source = max(states, key=lambda state: (state.step, -state.rank))
    record = ray.get(
        group.workers[source.rank].snapshot.remote(
            sum(state.epoch_loss_sum for state in states),
            sum(state.epoch_batches for state in states),
        ),
        timeout=timeout_s,
    )
    meta = assemble([record], False)
    return source, ray.put({"meta": meta, "shards": record.share, "wire": True})


def _is_worker_process(pid: int) -> bool:
    """Whether `pid` is still a Worker actor's process, not a process that reused the number of
    one that is gone: Ray titles it `ray::Worker`, or `ray::Worker.<method>` while it runs one."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    words = cmdline.split(b"\0", 1)[0].split()
    title = words[0] if words else b""
    return title == b"ray::Worker" or title.startswith(b"ray::Worker.")


class _Phases:
    def __init__(self) -> None:
        self.last_s, self.phases = time.monotonic(), {}

    def lap(self, name: str) -> float:
        now = time.monotonic()
        seconds, self.last_s = round(now - self.last_s, 3), now
        if name:
            self.phases[name] = seconds
        return seconds

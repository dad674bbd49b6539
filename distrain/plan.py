"""The run's batch and step arithmetic, computed once and passed down as a `StepPlan`.

One optimizer step consumes one global batch (`data.batch_size`) whatever the worker count: each
of the W workers takes global_batch / W samples (its local batch), in micro-batches of
`data.micro_batch_size` when it accumulates. Steps per epoch follow from the training set (the
tail that does not fill a global batch is left to the next epoch's permutation, see
distrain/sharding.py); total steps from `trainer.epochs` and `trainer.max_steps`. The driver plans
once, after the dry build has counted the training samples, and every part (scheduler, progress,
workers, the training loop) reads the same numbers. A new worker count after a failure
(elastic) is `plan.on(world_size)`: the same global batch and steps, more micro-batches each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from distrain.errors import ConfigError


@dataclass(frozen=True)
class StepPlan:
    world_size: int  # workers (ranks) training together
    global_batch: int  # samples per optimizer step, over all workers
    micro_batch: int  # samples per forward/backward on one worker (= local_batch: no accumulation)
    epochs: int
    steps_per_epoch: int
    total_steps: int  # optimizer steps of the whole run, trainer.max_steps included
    # trainer.workers: the ranks whose batch shares and random streams are the same whatever
    # the worker count; a smaller group's worker stands for several of them (`shares`).
    configured_workers: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.local_batch // self.micro_batch

    def on(self, world_size: int) -> StepPlan:
        """The same run on `world_size` workers (a divisor of the configured count): the same
        global batch and steps; each worker accumulates micro-batches of the size it had, so
        memory per step stays where it was."""
        local = self.global_batch // world_size
        if self.configured_workers % world_size or local % self.micro_batch:
            raise ConfigError(
                f"{world_size} workers cannot keep the global batch {self.global_batch} in "
                f"micro-batches of {self.micro_batch} as shares of the "
                f"{self.configured_workers} configured workers: the worker count must divide "
                "trainer.workers."
            )
        return dataclasses.replace(self, world_size=world_size)

    def shares(self, rank: int) -> range:
        """The configured ranks whose batch shares (and random streams) worker `rank` takes, in
        order: contiguous, as its local batch is (distrain/sharding.py)."""
        per_worker = self.configured_workers // self.world_size
        return range(rank * per_worker, (rank + 1) * per_worker)


def plan_steps(
    train_samples: int,
    *,
    global_batch: int,
    micro_batch: int | None,
    world_size: int,
    epochs: int,
    max_steps: int | None,
) -> StepPlan:
    """The plan of a run, or a ConfigError naming the batch setting that does not fit."""
    if global_batch % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch} (the global batch) cannot be split evenly over "
            f"trainer.workers={world_size}: choose a batch size divisible by {world_size}, "
            f"e.g. {max(world_size, global_batch // world_size * world_size)} "
            f"or {(global_batch // world_size + 1) * world_size}."
        )
    local = global_batch // world_size
    if micro_batch is not None and not (1 <= micro_batch <= local and local % micro_batch == 0):
        raise ConfigError(
            f"data.micro_batch_size={micro_batch} must divide the per-worker batch "
            f"{local} (= data.batch_size {global_batch} / trainer.workers {world_size}), "
            "or be null."
        )
    if train_samples < global_batch:
        raise ConfigError(
            f"data.batch_size={global_batch} is larger than the training set "
            f"({train_samples} samples): lower data.batch_size."
        )
    steps_per_epoch = train_samples // global_batch
    total_steps = epochs * steps_per_epoch
    return StepPlan(
        world_size=world_size,
        global_batch=global_batch,
        micro_batch=micro_batch or local,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=min(total_steps, max_steps or total_steps),
        configured_workers=world_size,
    )

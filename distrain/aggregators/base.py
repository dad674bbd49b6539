"""The gradient aggregator: the one place that makes workers agree on a gradient.

The training step stays the textbook loop; a strategy only decides what happens around it:

    optimizer = aggregator.build_optimizer(make_optimizer, params, shard=...)  # once
    model = aggregator.wrap(model)                                             # once
    with aggregator.sync_if(last_micro_batch): ...  # forward (+ backward) of each micro-batch
    aggregator.synchronize()                        # averaged gradients are in .grad after this
    optimizer.step()

Each strategy is a class named by `_target_` in `conf/aggregator/*.yaml`. Its driver-side
`rendezvous()` runs once per worker group before the workers connect (e.g. rank 0's address and a
free port for a process group, or starting parameter-server actors). Actors a strategy starts
there are named by its `actors(rendezvous)`; the driver kills them with the workers when the job
ends, however it ends.
"""

from __future__ import annotations

import contextlib
import resource
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from distrain.config import ConfigError

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class GradientAggregator(ABC):
    # Set by the worker before `wrap`: a strategy that waits for its peers in Python calls it
    # every `wait_beat_s` with the ranks it waits for; the worker reports a heartbeat, so the
    # driver's hang report names the ranks that stopped rather than the ones waiting for them.
    on_wait: Callable[[list[int]], None] | None = None
    wait_beat_s: float = 1.0

    @classmethod
    def check_job(cls, job: dict[str, Any]) -> None:
        """Driver side, before anything starts: reject settings this strategy cannot honour.

        Called by `config.validate`; raises ConfigError. The default accepts everything except
        `trainer.shard_optimizer`, which only a strategy that overrides `build_optimizer` supports.
        """
        if job["trainer"].get("shard_optimizer"):
            raise ConfigError(
                f"trainer.shard_optimizer=true is not supported by "
                f"aggregator._target_={job['aggregator']['_target_']}: optimizer-state sharding "
                "(ZeRO stage 1) needs aggregator=allreduce; set trainer.shard_optimizer=false."
            )

    @classmethod
    def rendezvous(cls, workers: list[Any], config: dict[str, Any]) -> dict[str, Any]:
        """Driver side, before `connect`: what every worker needs to join the group."""
        return {}

    @classmethod
    def actors(cls, rendezvous: dict[str, Any]) -> list[Any]:
        """Driver side: actors `rendezvous` started, killed with the worker group."""
        return []

    @abstractmethod
    def connect(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        rendezvous: dict[str, Any],
        timeout_s: float,
    ) -> None:
        """Worker side: join the group of `world_size` workers."""

    def build_optimizer(
        self, make_optimizer: MakeOptimizer, params: Iterable[nn.Parameter], *, shard: bool
    ) -> torch.optim.Optimizer:
        """The optimizer the loop steps. `shard` is `trainer.shard_optimizer` (see check_job)."""
        self.optimizer = make_optimizer(params)
        return self.optimizer

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward on (the same parameters as `model`)."""

    def sync_if(self, sync: bool) -> AbstractContextManager:
        """Context for one micro-batch; gradients are only communicated when `sync` is true."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Block until every parameter's `.grad` holds the average over all workers.

        Strategies call `super().synchronize()` last: it counts the step for `stats()`.
        """
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 1:  # the first optimizer step follows at once (start-up benchmarks)
            self.first_step_unix_s = time.time()

    def backward_wait_s(self) -> float:
        """Seconds the last backward spent blocked on this strategy's communication.

        For strategies that communicate inside backward (DDP); the loop moves this time from
        forward+backward to aggregation wait. Strategies that communicate in `synchronize()`
        need not override it: the loop times `synchronize()` itself.
        """
        return 0.0

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Leave the group."""

    def stats(self) -> dict[str, Any]:
        """This worker's counters after `close` (bytes sent, staleness, ...): for metrics.json."""
        return {
            "steps": getattr(self, "steps", 0),
            "first_step_unix_s": getattr(self, "first_step_unix_s", None),
            "optimizer_state_bytes": optimizer_state_bytes(getattr(self, "optimizer", None)),
            # This worker process's peak resident memory (Linux reports KiB).
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors in the optimizer's state held by this process (momenta, Adam moments).

    For a ZeroRedundancyOptimizer that is the local shard's optimizer, not the wrapper.
    """
    if optimizer is None:
        return 0
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard here
    return sum(
        value.numel() * value.element_size()
        for state in local.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )

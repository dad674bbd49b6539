"""The gradient aggregator: the one place that makes workers agree on a gradient.

The training step stays the textbook loop; a strategy only decides what happens around it:

    optimizer = aggregator.build_optimizer(make_optimizer, params, shard=...)  # once
    model = aggregator.wrap(model)                                             # once
    with aggregator.sync_if(last_micro_batch): ...  # forward (+ backward) of each micro-batch
    aggregator.synchronize()                        # averaged gradients are in .grad after this
    optimizer.step()

Each strategy is a class named by `_target_` in `conf/aggregator/*.yaml`. Its driver-side
`rendezvous()` runs once per worker group before the workers connect (e.g. the address of rank
0's process-group store, already listening, or starting parameter-server actors). Actors a
strategy starts there are named by its `actors(rendezvous)`; the driver kills them with the
workers when the job ends, however it ends.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from distrain.blocks import find_blocks
from distrain.config import Config, ConfigError
from distrain.device import peak_memory, peak_rss_mb

FIRST_STEPS = 8  # steps whose end times are kept for `first_step_extra_s`
# Parameters, or param groups (build.param_groups): what a torch optimizer's constructor takes.
MakeOptimizer = Callable[[ParamsT], torch.optim.Optimizer]


class GradientAggregator(ABC):
    # Set by the worker before `wrap`: a strategy that waits for its peers in Python calls it
    # every `wait_beat_s` with the ranks it waits for; the worker reports a heartbeat, so the
    # driver's hang report names the ranks that stopped rather than the ones waiting for them.
    on_wait: Callable[[list[int]], None] | None = None
    wait_beat_s: float = 1.0
    precision: str = "32"  # trainer.precision, set by the worker before `wrap`

    @classmethod
    def check_job(cls, job: Config) -> None:
        """Driver side, before anything starts: reject settings this strategy cannot honour.

        Called by `preflight.check` with the typed job; raises ConfigError. The default accepts
        everything except `trainer.shard_optimizer`, which only a strategy that overrides
        `build_optimizer` supports.
        """
        if job.trainer.shard_optimizer:
            raise ConfigError(
                f"trainer.shard_optimizer=true is not supported by "
                f"aggregator._target_={job.aggregator['_target_']}: optimizer-state sharding "
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

    @classmethod
    def heals_in_place(cls, config: dict[str, Any], *, shard_optimizer: bool) -> bool:
        """Whether every rank holds the whole training state after each step (replicas), so a
        failed rank can be replaced from a survivor's memory (distrain/healing.py). No by
        default: sharded state (FSDP, ZeRO) or state held elsewhere (a parameter server) is
        restored from a checkpoint."""
        return False

    @classmethod
    def resume_key(cls, config: dict[str, Any]) -> Any:
        """What a checkpoint's aggregator config must share with the resuming job's.

        The default is the whole config. Strategies whose step is the textbook one on the
        global batch return the same key, so a run resumes across them (e.g. fsdp <-> allreduce).
        """
        return config

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
        self, make_optimizer: MakeOptimizer, params: ParamsT, *, shard: bool
    ) -> torch.optim.Optimizer:
        """The optimizer the loop steps. `shard` is `trainer.shard_optimizer` (see check_job)."""
        self.optimizer = make_optimizer(params)
        return self.optimizer

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward on (the same parameters as `model`)."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's blocks (activation checkpointing; FSDP's units): its repeated blocks."""
        return find_blocks(model)

    def compile_units(self, model: nn.Module) -> list[nn.Module]:
        """What `trainer.compile=true` compiles, before `wrap`: the whole model by default."""
        return [model]

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
        if self.steps <= FIRST_STEPS:  # the first step's extra time (compilation, warm-up)
            self.__dict__.setdefault("step_ends_s", []).append(time.perf_counter())

    def backward_wait_s(self) -> float:
        """Seconds the last backward spent blocked on this strategy's communication.

        For strategies that communicate inside backward (DDP); the loop moves this time from
        forward+backward to aggregation wait. Strategies that communicate in `synchronize()`
        need not override it: the loop times `synchronize()` itself.
        """
        return 0.0

    def backward_cpu_wait_s(self) -> float:
        """Of the wait `backward_wait_s()` just returned, the seconds the training thread was
        ready to run but had no CPU core (distrain/timing.py's `cpu_wait_s`)."""
        return 0.0

    # True where the model's forward is itself a collective (FSDP): every rank must run each
    # forward (evaluation, sampling) in step.
    collective_forward = False
    # True where every rank holds the same replicated tensors after a step, so each writes 1/W
    # of them to a checkpoint (distrain/shards.py); the asynchronous parameter server's do not.
    identical_replicas = True

    def eval_batches(self, batches: Iterable[Any]) -> Iterable[Any]:
        """The validation batches this rank evaluates; a strategy whose forward is a collective
        makes every rank run the same number of them."""
        return batches

    # Checkpoints. `model_state_dict`: the full (unsharded) model, for model.pt at the end of a
    # run; called on every rank (a strategy may gather shards), rank 0's is kept.

    def model_state_dict(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()

    def load_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optimizer_state: dict[str, Any],
    ) -> None:
        """Every rank, from state dicts laid out as its own are (distrain/shards.py): the full
        state here (ZeRO keeps its share of the optimizer state)."""
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Leave the group."""

    def stats(self) -> dict[str, Any]:
        """This worker's counters after `close` (bytes sent, staleness, ...): for metrics.json."""
        optimizer = getattr(self, "optimizer", None)
        return {
            "steps": getattr(self, "steps", 0),
            "first_step_unix_s": getattr(self, "first_step_unix_s", None),
            "first_step_extra_s": self.first_step_extra_s(),
            **state_bytes(optimizer),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            # This worker process's peak resident memory (Linux reports KiB).
            "peak_rss_mb": peak_rss_mb(),
            **peak_memory(getattr(self, "device", None) or torch.device("cpu")),
        }

    def first_step_extra_s(self) -> float | None:
        """How much longer the first step took than the median of the next ones: with
        `trainer.compile=true`, the compilation. `fit_started_s` is set by the worker."""
        ends = getattr(self, "step_ends_s", [])
        start = getattr(self, "fit_started_s", None)
        if start is None or len(ends) < 3:
            return None
        steady = sorted(b - a for a, b in pairwise(ends))
        return max(0.0, ends[0] - start - steady[len(steady) // 2])


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` held by this process: a sharded DTensor's local shard only."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """This worker's bytes of trainable parameters and their gradients (those it optimizes)."""
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    return {
        "parameter_bytes": sum(local_bytes(p) for p in params),
        "gradient_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors in the optimizer's state held by this process (momenta, Adam moments).

    For a ZeroRedundancyOptimizer that is the local shard's optimizer, not the wrapper.
    """
    if optimizer is None:
        return 0
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard here
    return sum(
        local_bytes(value)
        for state in local.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )

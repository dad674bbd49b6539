"""The gradient aggregator: the one place that makes workers agree on a gradient.

The training step stays the textbook loop; a strategy only decides what happens around it:

    model = aggregator.wrap(model)                  # once
    with aggregator.sync_if(last_micro_batch): ...  # forward (+ backward) of each micro-batch
    aggregator.synchronize()                        # averaged gradients are in .grad after this
    optimizer.step()

Each strategy is a class named by `_target_` in `conf/aggregator/*.yaml`. Its driver-side
`rendezvous()` runs once per worker group before the workers connect (e.g. rank 0's address and a
free port for a process group, or starting parameter-server actors).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


class GradientAggregator(ABC):
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

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward on (the same parameters as `model`)."""

    def sync_if(self, sync: bool) -> AbstractContextManager:
        """Context for one micro-batch; gradients are only communicated when `sync` is true."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:  # noqa: B027 (optional hook: DDP needs none)
        """Block until every parameter's `.grad` holds the average over all workers."""

    def backward_wait_s(self) -> float:
        """Seconds the last backward spent blocked on this strategy's communication.

        For strategies that communicate inside backward (DDP); the loop moves this time from
        forward+backward to aggregation wait. Strategies that communicate in `synchronize()`
        need not override it: the loop times `synchronize()` itself.
        """
        return 0.0

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Leave the group."""

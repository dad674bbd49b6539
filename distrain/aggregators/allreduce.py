"""`aggregator=allreduce`: torch's DistributedDataParallel across the worker actors.

DDP's C++ reducer buckets gradients and all-reduces each bucket while backward is still running,
so communication overlaps computation; we reuse it rather than hand-rolling collectives.
Compression is one of DDP's own communication hooks (comm_hooks.py, which also counts the bytes).
`trainer.shard_optimizer=true` wraps the optimizer in torch's ZeroRedundancyOptimizer (ZeRO
stage 1): each rank keeps the optimizer state of its share of the parameters only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from distrain.aggregators import comm_hooks
from distrain.aggregators.base import GradientAggregator, MakeOptimizer
from distrain.aggregators.comm_timing import CommTimer
from distrain.config import ConfigError
from distrain.device import dist_backend


class AllReduce(GradientAggregator):
    def __init__(
        self,
        bucket_cap_mb: float = 25.0,
        gradient_as_bucket_view: bool = True,
        static_graph: bool = False,
        compression: str = "none",
        powersgd_rank: int = 2,
        powersgd_warmup_steps: int = 10,
    ) -> None:
        if compression not in comm_hooks.COMPRESSIONS:
            raise ConfigError(
                f"aggregator.compression={compression!r} is not one of "
                f"{', '.join(comm_hooks.COMPRESSIONS)}."
            )
        if bucket_cap_mb <= 0 or powersgd_rank < 1 or powersgd_warmup_steps < 0:
            raise ConfigError(
                f"aggregator.bucket_cap_mb={bucket_cap_mb} must be > 0, aggregator.powersgd_rank="
                f"{powersgd_rank} >= 1 and aggregator.powersgd_warmup_steps="
                f"{powersgd_warmup_steps} >= 0."
            )
        self.bucket_cap_mb = bucket_cap_mb
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.static_graph = static_graph
        self.compression = compression
        self.powersgd_rank = powersgd_rank
        self.powersgd_warmup_steps = powersgd_warmup_steps
        self.ddp: DistributedDataParallel | None = None
        self.comm_timer = CommTimer()
        self.optimizer: torch.optim.Optimizer | None = None
        self.comm = comm_hooks.CommCounter()
        self.steps = 0

    @classmethod
    def check_job(cls, job: dict[str, Any]) -> None:
        """Every job setting works with all-reduce, trainer.shard_optimizer included."""

    @classmethod
    def rendezvous(cls, workers: list[Any], config: dict[str, Any]) -> dict[str, Any]:
        # As Ray Train does: rank 0's node IP as Ray sees it (not localhost, so other nodes can
        # reach it) and a port that is free on that node right now.
        host, port = ray.get(workers[0].free_address.remote())
        return {"master_addr": host, "master_port": port}

    def connect(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        rendezvous: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.device = device
        # TORCH_NCCL_ASYNC_ERROR_HANDLING makes a stuck NCCL collective raise after `timeout`
        # instead of hanging forever (gloo honours the timeout natively).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend=dist_backend(device.type),
            init_method=f"tcp://{rendezvous['master_addr']}:{rendezvous['master_port']}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def build_optimizer(
        self, make_optimizer: MakeOptimizer, params: Iterable[nn.Parameter], *, shard: bool
    ) -> torch.optim.Optimizer:
        if not shard:
            self.optimizer = make_optimizer(params)
        else:
            # The optimizer config is `_partial_: true`: a partial of the class and its settings.
            if not isinstance(make_optimizer, functools.partial) or make_optimizer.args:
                raise ConfigError(
                    "trainer.shard_optimizer=true needs the optimizer config to name a "
                    "torch.optim class with keyword settings (_target_ + _partial_: true)."
                )
            self.optimizer = ZeroRedundancyOptimizer(
                params, optimizer_class=make_optimizer.func, **make_optimizer.keywords
            )
        return self.optimizer

    def wrap(self, model: nn.Module) -> nn.Module:
        self.ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
            static_graph=self.static_graph,
        )
        # DDP takes one hook: the counting hook for the compression, wrapped to be timed.
        self.comm = comm_hooks.register(
            self.ddp,
            self.compression,
            powersgd_rank=self.powersgd_rank,
            powersgd_warmup_steps=self.powersgd_warmup_steps,
            wrap=self.comm_timer.wrap,
        )
        return self.ddp

    def backward_wait_s(self) -> float:
        return self.comm_timer.pop_wait_s()

    def sync_if(self, sync: bool) -> AbstractContextManager:
        # DDP decides in forward whether backward all-reduces; no_sync() accumulates locally.
        assert self.ddp is not None, "wrap() the model first"
        return nullcontext() if sync else self.ddp.no_sync()

    def synchronize(self) -> None:
        super().synchronize()  # DDP has averaged during backward already: only count the step

    def stats(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        return {
            **super().stats(),
            "allreduce_payload_bytes_per_step": self.comm.payload_bytes / steps,
            "buckets_per_step": self.comm.buckets / steps,
        }

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

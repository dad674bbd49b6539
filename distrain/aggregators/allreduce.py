"""`aggregator=allreduce`: torch's DistributedDataParallel across the worker actors.

DDP's C++ reducer buckets gradients and all-reduces each bucket while backward is still running,
so communication overlaps computation; we reuse it rather than hand-rolling collectives.
Compression is one of DDP's own communication hooks.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distrain.aggregators.base import GradientAggregator
from distrain.aggregators.comm_timing import CommTimer
from distrain.device import dist_backend

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


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
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"aggregator.compression={compression!r} is not one of {', '.join(COMPRESSIONS)}"
            )
        self.bucket_cap_mb = bucket_cap_mb
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.static_graph = static_graph
        self.compression = compression
        self.powersgd_rank = powersgd_rank
        self.powersgd_warmup_steps = powersgd_warmup_steps
        self.ddp: DistributedDataParallel | None = None
        self.comm_timer = CommTimer()

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

    def wrap(self, model: nn.Module) -> nn.Module:
        self.ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
            static_graph=self.static_graph,
        )
        self._register_compression(self.ddp)
        return self.ddp

    def _register_compression(self, ddp: DistributedDataParallel) -> None:
        # DDP takes one hook; every branch goes through _register_hook so it is timed.
        if self.compression == "none":
            self._register_hook(ddp, None, default_hooks.allreduce_hook)
        elif self.compression == "fp16":
            self._register_hook(ddp, None, default_hooks.fp16_compress_hook)
        elif self.compression == "bf16":
            self._register_hook(ddp, None, default_hooks.bf16_compress_hook)
        elif self.compression == "powersgd":
            state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=self.powersgd_rank,
                start_powerSGD_iter=max(2, self.powersgd_warmup_steps),
            )
            self._register_hook(ddp, state, powerSGD_hook.powerSGD_hook)

    def _register_hook(self, ddp: DistributedDataParallel, state: Any, hook: Any) -> None:
        ddp.register_comm_hook(state, self.comm_timer.wrap(hook))

    def backward_wait_s(self) -> float:
        return self.comm_timer.pop_wait_s()

    def sync_if(self, sync: bool) -> AbstractContextManager:
        # DDP decides in forward whether backward all-reduces; no_sync() accumulates locally.
        assert self.ddp is not None, "wrap() the model first"
        return nullcontext() if sync else self.ddp.no_sync()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

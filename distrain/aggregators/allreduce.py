"""`aggregator=allreduce`: torch's DistributedDataParallel across the worker actors.

DDP's C++ reducer buckets gradients and all-reduces each bucket while backward is still running,
so communication overlaps computation; we reuse it rather than hand-rolling collectives.
Compression is one of DDP's own communication hooks (comm_hooks.py, which also counts the bytes).
`trainer.shard_optimizer=true` wraps the optimizer in torch's ZeroRedundancyOptimizer (ZeRO
stage 1): each rank keeps the optimizer state of its share of the parameters only.

With one worker there is nothing to average: no process group, no DDP, no hook (DDP with a
world of one still copies every gradient into its buckets and all-reduces them with itself,
~35 % of a small step), and ZeRO has nothing to shard.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import ParamsT

from distrain.aggregators import comm_hooks, process_group, shm_allreduce
from distrain.aggregators.base import GradientAggregator, MakeOptimizer
from distrain.aggregators.comm_timing import CommTimer
from distrain.aggregators.shm_allreduce import ShmAllReduce
from distrain.config import Config, ConfigError
from distrain.device import dist_backend, process_group_device, timing_event

log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "backend")


class AllReduce(GradientAggregator):
    def __init__(
        self,
        bucket_cap_mb: float = 25.0,
        gradient_as_bucket_view: bool = True,
        static_graph: bool = False,
        compression: str = "none",
        powersgd_rank: int = 2,
        powersgd_warmup_steps: int = 10,
        transport: str = "auto",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"aggregator.transport={transport!r} is not one of {', '.join(TRANSPORTS)}: auto "
                "uses shared memory between CPU workers on one node and the process group's "
                "backend (gloo/NCCL) otherwise; backend always uses the backend."
            )
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
        self.transport = transport
        self.shm: ShmAllReduce | None = None
        self.use_shm = False  # decided in connect(), the segment is made in wrap()
        self.ddp: DistributedDataParallel | None = None
        self.comm_timer = CommTimer()
        self.optimizer: torch.optim.Optimizer | None = None
        self.comm = comm_hooks.CommCounter()
        self.steps = 0
        self.world_size = 1

    @classmethod
    def check_job(cls, job: Config) -> None:
        """Every job setting works with all-reduce, trainer.shard_optimizer included."""

    @classmethod
    def heals_in_place(cls, config: dict[str, Any], *, shard_optimizer: bool) -> bool:
        # ZeRO shards the optimizer state; PowerSGD keeps per-rank error-feedback residuals.
        return not shard_optimizer and config.get("compression", "none") != "powersgd"

    @classmethod
    def resume_key(cls, config: dict[str, Any]) -> Any:
        # Buckets and transport do not change the step; compression does.
        if config.get("compression", "none") == "none":
            return "mean-gradient"  # as aggregator=fsdp's: resume across the two
        return config

    @classmethod
    def rendezvous(cls, workers: list[Any], config: dict[str, Any]) -> dict[str, Any]:
        # Rank 0's store, already listening on its node's IP (aggregators/process_group.py).
        if len(workers) == 1:
            return {}  # no group to join (see the module docstring)
        return ray.get(workers[0].serve_rendezvous.remote())

    def connect(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        rendezvous: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.device, self.world_size = device, world_size
        if timing_event(device) is not None:  # CUDA: time backward's wait on the GPU
            self.comm_timer.make_event = functools.partial(timing_event, device)
        if world_size == 1:
            return
        # TORCH_NCCL_ASYNC_ERROR_HANDLING makes a stuck NCCL collective raise after `timeout`
        # instead of hanging forever (gloo honours the timeout natively).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # NCCL: `device_id` (torch >= 2.3) binds the communicator to this GPU and creates it now
        # (eager init), so a broken NCCL setup fails here, in setup, where group.py retries it.
        process_group.join(
            dist_backend(device.type),
            rendezvous,
            rank=rank,
            world_size=world_size,
            timeout_s=timeout_s,
            device_id=process_group_device(device),
        )
        self.timeout_s = timeout_s
        if self.transport == "auto" and device.type == "cpu" and self.compression != "powersgd":
            nodes: list[Any] = [None] * world_size
            dist.all_gather_object(nodes, _node_identity())
            self.use_shm = len(set(nodes)) == 1 and shm_allreduce.supported()

    def build_optimizer(
        self, make_optimizer: MakeOptimizer, params: ParamsT, *, shard: bool
    ) -> torch.optim.Optimizer:
        if not shard or self.world_size == 1:
            self.optimizer = make_optimizer(params)
        else:
            # The optimizer config is `_partial_: true`: a partial of the class and its settings.
            if not isinstance(make_optimizer, functools.partial) or make_optimizer.args:
                raise ConfigError(
                    "trainer.shard_optimizer=true needs the optimizer config to name a "
                    "torch.optim class with keyword settings (_target_ + _partial_: true)."
                )
            # Imported here: torch.distributed.optim pulls in FSDP and DTensor, half a second of
            # start-up for every worker that does not shard its optimizer.
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(
                params, optimizer_class=make_optimizer.func, **make_optimizer.keywords
            )
        return self.optimizer

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        if self.use_shm:
            gradient_bytes = sum(
                p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
            )
            try:
                self.shm = ShmAllReduce(
                    gradient_bytes,
                    self.timeout_s,
                    on_wait=self.on_wait,
                    beat_s=self.wait_beat_s,
                )
            except OSError as error:  # the same on every rank: all fall back together
                log.warning("shared-memory all-reduce unavailable (%s); using gloo", error)
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
            shm=self.shm,
        )
        return self.ddp

    def backward_wait_s(self) -> float:
        return self.comm_timer.pop_wait_s()

    def backward_cpu_wait_s(self) -> float:
        return self.comm_timer.last_cpu_wait_s

    def sync_if(self, sync: bool) -> AbstractContextManager:
        # DDP decides in forward whether backward all-reduces; no_sync() accumulates locally.
        return nullcontext() if sync or self.ddp is None else self.ddp.no_sync()

    def synchronize(self) -> None:
        super().synchronize()  # DDP has averaged during backward already: only count the step

    def stats(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        return {
            **super().stats(),
            "allreduce_payload_bytes_per_step": self.comm.payload_bytes / steps,
            "buckets_per_step": self.comm.buckets / steps,
            "transport": self.transport_name(),
        }

    def transport_name(self) -> str:
        if self.world_size == 1:
            return "none"
        return "shm" if self.shm is not None else dist_backend(self.device.type)

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _node_identity() -> str:
    """Which machine this rank runs on: Ray's node id in a Ray worker; outside Ray (ranks
    started by torchrun or multiprocessing) the host name, without starting a Ray for it, as
    `ray.get_runtime_context()` would."""
    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()

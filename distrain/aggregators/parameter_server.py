"""`aggregator=parameter_server`: gradients averaged (or applied) by sharded Ray server actors.

No collective backend: workers talk to `aggregator.servers` actors through Ray. The worker's
parameters, flattened, form one float32 vector split into K contiguous shards of near-equal size;
server k owns shard k (ps_servers.py). A step costs each worker one flatten (one `torch.cat`), K
remote calls that carry their shard as numpy arrays, and K copies back: no per-tensor pickling,
and nothing proportional to the number of parameter tensors crosses Ray. On a GPU the flat
gradient lives in a persistent device buffer and crosses to pinned host memory with one
asynchronous copy and one event wait per step; the reply goes back asynchronously.

* `mode=sync`: exact synchronous SGD. Servers return the mean gradient shard once all W workers
  pushed; it lands in `.grad` and every worker's own optimizer steps, as with all-reduce.
* `mode=async`: bounded-staleness asynchronous SGD. Servers own the parameters and optimizer of
  their shard and apply each gradient as it arrives; a worker copies the returned parameters
  into its model and its local optimizer step is a no-op (`ServerSteppedOptimizer`). A gradient
  computed on parameters more than `max_staleness` versions of that shard old is dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import ray
import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from distrain.aggregators.base import GradientAggregator, MakeOptimizer
from distrain.aggregators.ps_servers import (
    AveragingServer,
    UpdatingServer,
    num_chunks,
    write_chunks,
)
from distrain.config import Config, ConfigError
from distrain.device import copy_event, pinned

MODES = ("sync", "async")


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """[start, end) of `shards` contiguous pieces of `numel` elements; sizes differ by <= 1."""
    base, extra = divmod(numel, shards)
    bounds, start = [], 0
    for k in range(shards):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class ServerSteppedOptimizer(torch.optim.Optimizer):
    """`mode=async`: the servers step; on the worker this only carries the learning rate.

    An LR scheduler sets `param_groups[0]["lr"]` here as usual and the worker sends it with each
    gradient, so schedules work unchanged.
    """

    def __init__(self, params: list[nn.Parameter], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def step(self, closure: Any = None) -> Any:
        return None if closure is None else closure()


class ParameterServer(GradientAggregator):
    def __init__(self, servers: int = 2, mode: str = "sync", max_staleness: int = 4) -> None:
        if not isinstance(servers, int) or servers < 1:
            raise ConfigError(f"aggregator.servers={servers} must be a whole number >= 1.")
        if mode not in MODES:
            raise ConfigError(f"aggregator.mode={mode!r} is not one of {', '.join(MODES)}.")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ConfigError(
                f"aggregator.max_staleness={max_staleness} must be a whole number >= 0 "
                "(versions of a shard a gradient may lag behind; async mode)."
            )
        self.num_servers, self.mode, self.max_staleness = servers, mode, max_staleness
        # Async: each worker holds the version of each shard it last pulled.
        self.identical_replicas = mode == "sync"
        self.sync_s = 0.0  # time this worker spent in push/pull round trips
        self.steps = 0  # counted by GradientAggregator.synchronize

    @classmethod
    def check_job(cls, job: Config) -> None:
        super().check_job(job)  # trainer.shard_optimizer: servers hold no optimizer to shard
        mode = job.aggregator.get("mode", "sync")
        if mode == "async" and job.trainer.precision == "16":
            raise ConfigError(
                "trainer.precision=16 cannot be used with aggregator=parameter_server "
                "aggregator.mode=async: the servers would apply loss-scaled fp16 gradients. "
                "Use trainer.precision=bf16 or 32, or aggregator.mode=sync."
            )
        if mode == "async" and job.trainer.max_grad_norm is not None:
            raise ConfigError(
                f"trainer.max_grad_norm={job.trainer.max_grad_norm} cannot be used with "
                "aggregator=parameter_server aggregator.mode=async: each server applies a "
                "worker's gradient shard as it arrives, so no averaged gradient exists whose norm "
                "could be clipped. Use aggregator.mode=sync, or trainer.max_grad_norm=null."
            )
        if not job.optimizer.get("decay_norms_and_biases", True):
            raise ConfigError(
                "optimizer.decay_norms_and_biases=false cannot be used with "
                "aggregator=parameter_server: each server steps one flat slice of all the "
                "parameters, which has no per-parameter groups. Use aggregator=allreduce or fsdp, "
                "or optimizer.decay_norms_and_biases=true."
            )

    @classmethod
    def rendezvous(cls, workers: list[Any], config: dict[str, Any]) -> dict[str, Any]:
        """Start the server actors (0 CPUs: they fit beside the workers, which do the compute)."""
        settings = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        world_size, job_id = len(workers), uuid.uuid4().hex[:8]
        if settings.mode == "sync":
            server, args = AveragingServer, (world_size,)
        else:
            server, args = UpdatingServer, (world_size, settings.max_staleness)
        servers = [
            ray.remote(server)
            .options(
                num_cpus=0,
                # One thread per worker's call (+ spare): barriers wait without blocking others.
                max_concurrency=2 * world_size + 2,
                scheduling_strategy="SPREAD",
                name=f"distrain-ps-{job_id}-{k}",
            )
            .remote(*args)
            for k in range(settings.num_servers)
        ]
        return {"servers": servers}

    @classmethod
    def actors(cls, rendezvous: dict[str, Any]) -> list[Any]:
        return list(rendezvous.get("servers", []))

    def connect(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        rendezvous: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.rank, self.device, self.timeout_s = rank, device, timeout_s
        self.servers = rendezvous["servers"]

    def build_optimizer(
        self, make_optimizer: MakeOptimizer, params: ParamsT, *, shard: bool
    ) -> torch.optim.Optimizer:
        params = list(params)
        self.make_optimizer = make_optimizer
        self.optimizer = make_optimizer(params)
        if self.mode == "async":  # its defaults (lr, ...) only; its state is never created
            self.optimizer = ServerSteppedOptimizer(params, self.optimizer.defaults)
        return self.optimizer

    def wrap(self, model: nn.Module) -> nn.Module:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ConfigError("aggregator=parameter_server needs float32 parameters.")
        numel = sum(p.numel() for p in self.params)
        self.bounds = shard_bounds(numel, len(self.servers))
        self.chunks = [num_chunks((b - a) * 4) for a, b in self.bounds]
        extra = 0 if self.mode == "sync" else 1  # async replies end with the shard's version
        self.push_pull = [
            server.push_pull.options(num_returns=n + extra)
            for server, n in zip(self.servers, self.chunks)
        ]
        # Host buffers the object store reads from / replies are copied into; on a CPU device
        # the received buffer is the one the model uses (no extra copy). On a GPU they are pinned
        # (page-locked), so copies to and from the device run asynchronously, and the device
        # keeps one persistent flat gradient buffer: no allocation per step.
        self.on_cpu = self.device.type == "cpu"
        self.send = pinned(torch.empty(numel, dtype=torch.float32), self.device)
        self.recv_host = pinned(torch.empty(numel, dtype=torch.float32), self.device)
        self.recv = (
            self.recv_host if self.on_cpu else torch.empty_like(self.recv_host, device=self.device)
        )
        self.flat_grads = None if self.on_cpu else torch.empty_like(self.recv)
        self.recv_views = [
            self.recv[a:b].view_as(p) for p, (a, b) in zip(self.params, _offsets(self.params))
        ]
        if self.mode == "async":  # the model's parameters follow `recv`, where replies land
            with torch.no_grad():
                torch.cat([p.detach().reshape(-1) for p in self.params], out=self.recv)
            # On a CPU the parameters become views of `recv` (no copy per step). On a GPU they
            # keep their own storage, refreshed in place after each reply (_receive): a cuDNN
            # RNN's weights stay in the one contiguous buffer cuDNN wants.
            if self.on_cpu:
                for p, view in zip(self.params, self.recv_views):
                    p.data = view
            self.versions: list[int] | None = None  # the servers get their shards at step 1
        return model

    def _register(self) -> None:
        """async: give the servers their shards, as the model is now (after any checkpoint load).

        The first worker's shard wins (all ranks hold the same parameters), with the optimizer
        built from the same `_partial_` config on each server.
        """
        if not self.on_cpu:
            with torch.no_grad():  # the model as it is now (a checkpoint may have been loaded)
                torch.cat([p.detach().reshape(-1) for p in self.params], out=self.recv)
            self.recv_host.copy_(self.recv)
        params = self.recv_host.numpy()
        refs = [
            server.init.remote(params[a:b], self.make_optimizer)
            for server, (a, b) in zip(self.servers, self.bounds)
        ]
        replies = ray.get(refs, timeout=self.timeout_s)
        self._receive([[shard] for shard, _ in replies])
        self.versions = [version for _, version in replies]

    def synchronize(self) -> None:
        started = time.perf_counter()
        if self.mode == "async" and self.versions is None:
            self._register()
        send = self._flatten_grads()
        if self.mode == "sync":
            heads = [(self.rank, self.steps)] * len(self.servers)  # steps done so far
        else:  # the gradient's versions, and the lr of the worker's schedule
            lr = self.optimizer.param_groups[0]["lr"]
            heads = [(self.rank, version, lr) for version in self.versions]
        refs = [
            push_pull.remote(*head, *np.array_split(send[a:b], n))
            for push_pull, head, n, (a, b) in zip(self.push_pull, heads, self.chunks, self.bounds)
        ]
        refs = [r if isinstance(r, list) else [r] for r in refs]
        flat = ray.get([ref for server_refs in refs for ref in server_refs], timeout=self.timeout_s)
        replies, start = [], 0
        for server_refs in refs:
            replies.append(flat[start : start + len(server_refs)])
            start += len(server_refs)
        if self.mode == "sync":
            self._receive(replies)
            for p, view in zip(self.params, self.recv_views):
                p.grad = view
        else:
            self._receive([reply[:-1] for reply in replies])  # the parameters, in place
            self.versions = [reply[-1] for reply in replies]
        self.sync_s += time.perf_counter() - started
        super().synchronize()

    def _flatten_grads(self) -> np.ndarray:
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ]
        if self.on_cpu:
            torch.cat(grads, out=self.send)
        else:  # into the persistent device buffer, then one async copy and one event sync
            torch.cat(grads, out=self.flat_grads)
            self.send.copy_(self.flat_grads, non_blocking=True)
            copied = copy_event(self.device)
            copied.record()
            copied.synchronize()  # the step's only wait for the device
        return self.send.numpy()

    def _receive(self, replies: list[list[np.ndarray]]) -> None:
        """Copy each server's shard (as its chunks) into the received buffer."""
        recv = self.recv_host.numpy()
        for (a, b), chunks in zip(self.bounds, replies):
            write_chunks(recv[a:b], chunks, add=False)
        if self.on_cpu:
            return
        # Queued on the stream, so later kernels see it; the host buffer is not rewritten
        # before the next step's event sync, by which time this copy is done.
        self.recv.copy_(self.recv_host, non_blocking=True)
        if self.mode == "async":
            with torch.no_grad():
                for p, view in zip(self.params, self.recv_views):
                    p.copy_(view)

    def close(self) -> None:
        # A last barrier: every worker leaves with the servers' final counters.
        refs = [server.finish.remote(self.rank) for server in self.servers]
        self.server_stats = ray.get(refs, timeout=self.timeout_s)

    def stats(self) -> dict[str, Any]:
        servers = getattr(self, "server_stats", [])
        stats: dict[str, Any] = {
            **super().stats(),
            "mode": self.mode,
            "servers": len(self.servers),
            "shard_sizes": [b - a for a, b in self.bounds],
            "pushed_bytes_per_step": int(self.send.numel() * self.send.element_size()),
            "sync_s": self.sync_s,
            "per_server": servers,
        }
        if self.mode == "async" and servers:
            stats["max_staleness"] = self.max_staleness
            stats["applied"] = sum(s["applied"] for s in servers)
            stats["dropped"] = sum(s["dropped"] for s in servers)
            stats["max_staleness_applied"] = max(s["max_staleness_applied"] for s in servers)
            stats["max_staleness_seen"] = max(s["max_staleness_seen"] for s in servers)
        return stats


def _offsets(params: list[nn.Parameter]) -> list[tuple[int, int]]:
    """[start, end) of each parameter in the flattened vector."""
    offsets, start = [], 0
    for p in params:
        offsets.append((start, start + p.numel()))
        start += p.numel()
    return offsets

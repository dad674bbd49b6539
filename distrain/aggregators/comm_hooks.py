"""DDP communication hooks for `aggregator.compression`, counting the bytes they all-reduce.

The hooks themselves are torch's (`default_hooks`, `powerSGD_hook`); each is wrapped so that
every bucket adds the size of the tensors it hands to `all_reduce` to a `CommCounter`. That is the
payload per worker and step; a ring all-reduce puts about 2·(W−1)/W times that on each worker's
link, the same factor for every compression, so ratios between compressions are exact.
"""

# No `from __future__ import annotations`: DDP compares the hooks' annotations with the real
# dist.GradBucket / Future classes at registration.
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.profiler import record_function

from distrain.aggregators.shm_allreduce import ShmAllReduce

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


@dataclass
class CommCounter:
    payload_bytes: int = 0  # bytes handed to all_reduce by this worker since the start
    buckets: int = 0  # buckets communicated since the start


def _cast_hook(hook: Hook, dtype: torch.dtype | None, counter: CommCounter) -> Hook:
    """torch's all-reduce / fp16 / bf16 hook; they all-reduce the whole bucket cast to `dtype`.

    Wrapping also lets bf16 run on gloo with a CPU-only torch: DDP refuses a hook *named*
    `bf16_compress_hook` unless CUDA and NCCL >= 2.10 are present (not in a CPU-only torch
    build), though gloo all-reduces bf16 tensors fine.
    """

    def counted(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        counter.payload_bytes += buffer.numel() * (dtype or buffer.dtype).itemsize
        counter.buckets += 1
        return hook(state, bucket)

    return counted


def _shm_hook(shm: ShmAllReduce, dtype: torch.dtype | None, counter: CommCounter) -> Hook:
    """As `_cast_hook`'s hooks (divide by the world size, then sum, in `dtype`), through shared
    memory instead of the process group (shm_allreduce.py). It completes before it returns."""

    def counted(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        payload = buffer.to(dtype) if dtype is not None else buffer  # a copy only when cast
        counter.payload_bytes += payload.numel() * payload.element_size()
        counter.buckets += 1
        # Named in torch.profiler traces, as gloo names its own ("gloo:all_reduce"), only while
        # one records: an idle record_function still costs ~7 us a bucket, 0.1 us the check.
        profiling = torch.autograd._profiler_enabled()
        with record_function("shm:all_reduce") if profiling else contextlib.nullcontext():
            shm.all_reduce_sum_(payload.div_(shm.world_size))
        if payload is not buffer:
            buffer.copy_(payload)
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(buffer)
        return future

    return counted


def _powersgd_hook(state: powerSGD_hook.PowerSGDState, counter: CommCounter) -> Hook:
    """torch's PowerSGD hook; bytes from PowerSGD's own element accounting (P, Q, uncompressed)."""

    def counted(
        state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        # During warm-up PowerSGD all-reduces the plain bucket (and does not update its counts).
        warm_up = state.iter < state.start_powerSGD_iter
        numel_before = state.total_numel_after_compression
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        numel = buffer.numel() if warm_up else state.total_numel_after_compression - numel_before
        counter.payload_bytes += numel * buffer.element_size()
        counter.buckets += 1
        return future

    return counted


def register(
    ddp: torch.nn.parallel.DistributedDataParallel,
    compression: str,
    *,
    powersgd_rank: int,
    powersgd_warmup_steps: int,
    wrap: Callable[[Any], Any] = lambda hook: hook,
    shm: ShmAllReduce | None = None,
) -> CommCounter:
    """Register the counting hook for `compression` on `ddp` (passed through `wrap`, e.g. a
    timer); returns its counter. With `shm` (not for powersgd) buckets go through shared memory.
    """
    counter = CommCounter()
    dtypes = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if shm is not None and compression in dtypes:
        ddp.register_comm_hook(None, wrap(_shm_hook(shm, dtypes[compression], counter)))
        return counter
    if compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            # PowerSGD's error feedback needs at least 2 plain steps first.
            start_powerSGD_iter=max(2, powersgd_warmup_steps),
        )
        ddp.register_comm_hook(state, wrap(_powersgd_hook(state, counter)))
        return counter
    hook, dtype = {
        "none": (default_hooks.allreduce_hook, None),
        "fp16": (default_hooks.fp16_compress_hook, torch.float16),
        "bf16": (default_hooks.bf16_compress_hook, torch.bfloat16),
    }[compression]
    ddp.register_comm_hook(None, wrap(_cast_hook(hook, dtype, counter)))
    return counter

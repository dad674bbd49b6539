"""Device, collective backend, autocast and gradient scaling: decided here and nowhere else."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

CPU, CUDA = "cpu", "cuda"


def choose_device_type(requested: str, cluster_gpus: float) -> str:
    """`trainer.device` (auto|cpu|cuda) and the cluster's GPU count -> "cpu" or "cuda"."""
    if requested == "auto":
        return CUDA if cluster_gpus >= 1 else CPU
    return requested


def gpus_per_worker(device_type: str) -> int:
    return 1 if device_type == CUDA else 0


def worker_device(device_type: str) -> torch.device:
    """The device a worker actor owns.

    Ray sets CUDA_VISIBLE_DEVICES of each GPU actor to the one GPU it reserved, so inside the
    actor that GPU is always index 0.
    """
    if device_type == CUDA:
        torch.cuda.set_device(0)
        return torch.device(CUDA, 0)
    return torch.device(CPU)


def dist_backend(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == CUDA else "gloo"


def autocast_factory(device_type: str, precision: str) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the forward pass's autocast context for `trainer.precision`."""
    if precision == "32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against underflow; bf16 and fp32 get a disabled (no-op) scaler."""
    return torch.amp.GradScaler(device_type, enabled=precision == "16")


def peak_memory(device: torch.device) -> dict[str, float]:
    """This worker's peak memory: tensors allocated on its GPU, or the process's resident set
    on a CPU (Linux reports `ru_maxrss` in KiB)."""
    if device.type == CUDA:
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

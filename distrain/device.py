"""Device, collective backend, autocast and gradient scaling: decided here and nowhere else."""

from __future__ import annotations

import contextlib
import os
import re
import resource
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from distrain.config import ConfigError

CPU, CUDA = "cpu", "cuda"
# Ray leaves CUDA_VISIBLE_DEVICES alone when this is "1": every actor then sees all the node's GPUs
# and must pick its own by the id Ray assigned it.
NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def choose_device_type(
    requested: str,
    cluster_gpus: float,
    workers: int = 1,
    autoscaler_gpus: float = 0.0,
    gpus_per_worker: float = 1.0,
) -> str:
    """`trainer.device` (auto|cpu|cuda) and the cluster's GPUs -> "cpu" or "cuda".

    `auto` picks cuda only when the GPUs cover every worker's share, counting what an autoscaler
    may add (`autoscaler_gpus`, its maximum): a cluster with fewer GPUs than the workers need
    would otherwise wait for GPUs that never come.
    """
    if requested == "auto":
        need = max(workers, 1) * gpus_per_worker
        return CUDA if max(cluster_gpus, autoscaler_gpus) >= need - 1e-9 else CPU
    return requested


def worker_gpus(device_type: str, gpus_per_worker: float = 1.0) -> float:
    """The GPUs Ray reserves per worker (trainer.gpus_per_worker on cuda, none on cpu)."""
    return gpus_per_worker if device_type == CUDA else 0


def assigned_gpu_ids() -> list[str]:
    """The GPU ids Ray reserved for this actor (strings, as Ray reports them in the env var)."""
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


@dataclass(frozen=True)
class DevicePlacement:
    visible: str | None  # CUDA_VISIBLE_DEVICES to set before any CUDA call (None: leave it)
    index: int  # the local CUDA device index this rank uses
    shared: bool = False  # another rank uses the same GPU (trainer.gpus_per_worker < 1)


# Set once per worker process by `worker_device`: NCCL refuses two ranks on one GPU.
_gpu_shared = False


def _id_order(gpu_id: str) -> tuple[int, int | str]:
    return (0, int(gpu_id)) if gpu_id.isdigit() else (1, gpu_id)


def share_visible_devices(
    placements: Sequence[tuple[str, Sequence[str]]],
    *,
    noset: bool = False,
    process_visible: Sequence[str | None] = (),
) -> list[DevicePlacement]:
    """Per rank, from each rank's (node id, GPU ids Ray assigned it): what it should see and use.

    As Ray Train does: every worker on a node sees the union of that node's assigned GPUs (NCCL
    finds NVLink/NVSwitch peers and sets up faster, and NVLS needs it), and picks its own by its
    position in that list. Under RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 Ray sets nothing:
    rank r's process sees `process_visible[r]` (its CUDA_VISIBLE_DEVICES; every GPU when unset),
    and its assigned id is looked up there.
    """
    if any(not ids for _, ids in placements):
        raise ValueError(f"a CUDA worker was given no GPU by Ray: {list(placements)}")
    users: dict[tuple[str, str], int] = {}  # (node, GPU id) -> ranks using it
    for node, ids in placements:
        users[node, str(ids[0])] = users.get((node, str(ids[0])), 0) + 1
    out = []
    if noset:
        for rank, (node, ids) in enumerate(placements):
            env = process_visible[rank] if rank < len(process_visible) else None
            visible = [v.strip() for v in (env or "").split(",") if v.strip()]
            own = str(ids[0])
            index = visible.index(own) if visible else int(own)
            out.append(DevicePlacement(None, index, users[node, own] > 1))
        return out
    per_node: dict[str, set[str]] = {}
    for node, ids in placements:
        per_node.setdefault(node, set()).update(str(i) for i in ids)
    for node, ids in placements:
        node_ids = sorted(per_node[node], key=_id_order)
        own = str(ids[0])
        out.append(DevicePlacement(",".join(node_ids), node_ids.index(own), users[node, own] > 1))
    return out


def noset_visible_devices() -> bool:
    return os.environ.get(NOSET_ENV, "0").lower() in ("1", "true")


def worker_device(device_type: str, placement: DevicePlacement | None = None) -> torch.device:
    """The device a worker actor owns; for cuda, `placement` says which (see share_visible_devices).

    CUDA_VISIBLE_DEVICES is read when CUDA initialises, so it is set here before the first call.
    """
    global _gpu_shared
    if device_type != CUDA:
        return torch.device(CPU)
    placement = placement or DevicePlacement(visible=None, index=0)
    _gpu_shared = placement.shared
    if placement.visible is not None:
        os.environ[VISIBLE_ENV] = placement.visible
    torch.cuda.set_device(placement.index)
    return torch.device(CUDA, placement.index)


def default_tf32(device: torch.device) -> bool:
    """TF32 matmul/convolutions by default on Ampere and newer (compute capability >= 8)."""
    return device.type == CUDA and torch.cuda.get_device_capability(device)[0] >= 8


def configure_math(device: torch.device, precision: str, tf32: bool | None) -> None:
    """Per-process math settings of a CUDA worker; a CPU worker is left as torch sets it.

    `tf32` None means `default_tf32`. bf16 on a GPU without bf16 support is a ConfigError (autocast
    would otherwise quietly run in fp32 or fail deep in a kernel).
    """
    if device.type != CUDA:
        return
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"trainer.precision=bf16 needs a GPU with bf16 support; {name} has none. "
            "Use trainer.precision=16 (fp16 with loss scaling) or 32."
        )
    use_tf32 = default_tf32(device) if tf32 is None else tf32
    torch.set_float32_matmul_precision("high" if use_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = use_tf32
    # Fixed input shapes (a full batch every step): the autotuner's pick is reused.
    torch.backends.cudnn.benchmark = True


def dist_backend(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes and between ranks sharing a GPU (NCCL
    refuses two ranks on one device; gloo all-reduces CUDA tensors through host memory)."""
    return "nccl" if device_type == CUDA and not _gpu_shared else "gloo"


def process_group_device(device: torch.device) -> torch.device | None:
    """`device_id` for init_process_group: NCCL binds the communicator to it (eager init)."""
    return device if dist_backend(device.type) == "nccl" else None


def autocast_factory(device_type: str, precision: str) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the forward pass's autocast context for `trainer.precision`."""
    if precision == "32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against underflow; bf16 and fp32 get a disabled (no-op) scaler."""
    return torch.amp.GradScaler(device_type, enabled=precision == "16")


def timing_event(device: torch.device) -> Any:
    """A CUDA event that records GPU time (timing.EventClock); None on CPU."""
    return torch.cuda.Event(enable_timing=True) if device.type == CUDA else None


def copy_event(device: torch.device) -> Any:
    """A CUDA event without timing, to wait for one asynchronous copy; None on CPU."""
    return torch.cuda.Event() if device.type == CUDA else None


def to_cpu(value: Any) -> Any:
    """Tensors (nested in dicts/lists) on the CPU: a checkpoint must load where there is no GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` in page-locked memory when it feeds a GPU (async copies need it), else as is."""
    return tensor.pin_memory() if device.type == CUDA else tensor


def peak_memory(device: torch.device) -> dict[str, float]:
    """This worker's peak memory: tensors allocated on its GPU, or the process's resident set
    on a CPU."""
    if device.type == CUDA:
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_memory_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set since it started or `reset_peak_memory`: Linux's VmHWM
    (what `reset_peak_memory` resets), else `ru_maxrss` (KiB on Linux)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        found = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory figures afresh: a kept worker's next job (warm_workers.py) reports
    its own peak, not the largest of the jobs this process ran."""
    if device.type == CUDA:
        torch.cuda.reset_peak_memory_stats(device)
    # "5": reset the peak resident set (Linux >= 4.0).
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")

"""Model FLOPs utilisation: the FLOPs a model needs per token against what the device can do.

FLOPs per token: the model's own `flops_per_token(T)` when it has one (distrain's GPT: 6N +
12·L·d·T, PaLM appendix B), else 6N (the matmuls alone). The peak: `trainer.peak_tflops` when
set; a GPU's dense bf16/fp32 peak from its datasheet (table below); on a CPU, a matmul measured
once on the worker's own threads and cached in ~/.cache/distrain, so a CPU user also sees how far
the run is from what the machine does on one big matmul.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

CACHE = Path(os.environ.get("DISTRAIN_CACHE", Path.home() / ".cache" / "distrain"))
# Dense TFLOP/s per GPU by name fragment: (bf16/fp16 tensor cores, fp32 without TF32), datasheets.
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 SXM": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A10G": (70.0, 31.2),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
}


def flops_per_token(model: nn.Module, block_size: int) -> float:
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(block_size))
    return 6.0 * sum(p.numel() for p in model.parameters())


def peak_flops_per_s(device: torch.device, precision: str, peak_tflops: float | None) -> float:
    """The peak one worker's device is measured against (FLOP/s)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cpu":
        return measured_cpu_peak(torch.get_num_threads(), precision)
    name = torch.cuda.get_device_name(device)
    for fragment, (half, full) in GPU_PEAK_TFLOPS.items():
        if fragment in name:
            return (full if precision == "32" else half) * 1e12
    return 0.0  # unknown GPU: MFU is not reported unless trainer.peak_tflops is set


def measured_cpu_peak(threads: int, precision: str, size: int = 512, min_s: float = 1.0) -> float:
    """Best FLOP/s of a size x size matmul on `threads` threads, measured once per machine.

    The best of many short matmuls over `min_s`: on a shared machine most are slowed by other
    processes, and a 512 x 512 one (~3 ms on one core) often runs between interruptions, where a
    larger one rarely does (measured here under load: 1024 gave 30 GFLOP/s, 512 gave 104).
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    machine = platform.processor() or platform.machine()
    key = f"{machine}|{_cpu_model()}|{threads}|{dtype}|{size}|{torch.__version__}"
    path = CACHE / "cpu_peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best_s, started = float("inf"), time.perf_counter()
        while time.perf_counter() - started < min_s:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best_s = min(best_s, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous_threads)
    peak = 2 * size**3 / best_s
    cache[key] = peak
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measured again next time
    return peak


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""

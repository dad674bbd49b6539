"""Shared CLI, clock and reporting for the peer baselines.

Every baseline prints exactly one JSON line (see `result`); the definitions of the measured
quantities live here so all baselines measure the same thing.
"""

import argparse
import json
import os
import resource
import time
from collections import deque

from benchmarks.workloads import WORKLOADS, Workload

LOSS_WINDOW = 10  # final_loss is the mean of the last LOSS_WINDOW step losses (less noisy)


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workload", choices=WORKLOADS, default="digits_mlp")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-per-worker", type=int, default=None, help="default: workload's")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--measure-steps", type=int, default=100)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t0", type=float, default=None, help="epoch seconds of the launch command")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torchrun_ddp only")
    args = p.parse_args()
    if args.warmup_steps < 1 or args.measure_steps < 1:
        p.error("--warmup-steps and --measure-steps must be >= 1")
    return args


def process_start_time(pid: int | None = None) -> float:
    """Epoch seconds at which process `pid` (default: this one) was started, from /proc.

    Used as t0 when the caller gives none: unlike a time.time() at the top of the script it also
    counts interpreter start-up and imports, which a user waits for too.
    """
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
        # Field 22 (starttime, clock ticks since boot); split after the ")" of the command name.
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Call `tick(loss)` right after every optimizer.step(); it returns True once all steps ran.

    The measured window starts after `warmup` steps and spans exactly `measure` steps, so
    start-up, allocator growth and first-touch costs stay out of the steady-state rate.
    """

    def __init__(self, t0: float, warmup: int, measure: int) -> None:
        self.t0, self.warmup, self.total = t0, warmup, warmup + measure
        self.steps = 0
        self.first_step_s = self.window_start = self.window_end = 0.0
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)

    def tick(self, loss: float) -> bool:
        now = time.time()
        self.steps += 1
        self.losses.append(loss)
        if self.steps == 1:
            self.first_step_s = now - self.t0
        if self.steps == self.warmup:
            self.window_start = now
        if self.steps == self.total:
            self.window_end = now
        return self.steps >= self.total

    def samples_per_s(self, global_batch: int) -> float:
        return (self.total - self.warmup) * global_batch / (self.window_end - self.window_start)

    def final_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def batch_size(args: argparse.Namespace, workload: Workload) -> int:
    return args.batch_per_worker or workload.batch_per_worker


def result(name: str, args: argparse.Namespace, batch: int, **measured: float) -> str:
    """The single JSON line a baseline prints: its config plus the measured values."""
    row = {
        "name": name,
        "workload": args.workload,
        "workers": args.workers,
        "batch_per_worker": batch,
        "steps": args.warmup_steps + args.measure_steps,
    }
    row.update({k: round(v, 4) for k, v in measured.items()})
    return json.dumps(row)

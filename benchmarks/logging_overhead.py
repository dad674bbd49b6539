"""What per-iteration logging costs: the same job with `logger.log_every_n_steps` at the default
(10, `default`), at 1 (`every_step`), and `off` (an interval longer than the run: only the last
step is logged).

One process, one Ray (`ray.init` once; every job joins it), repetitions alternating between the
settings so drifting load on a shared machine hits them alike. The figure is the median of each
setting's training samples/s (metrics.json's `samples_per_s`: training loops only, evaluation and
start-up excluded) divided by the median with logging off.

    PYTHONPATH=$PWD python benchmarks/logging_overhead.py [--reps 7] [--epochs 20]
        [--settings default,off,every_step]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import ray

from distrain import driver
from distrain.cli import compose_job
from distrain.rundir import RunDirectory

SETTINGS = {"default": 10, "every_step": 1, "off": 10**9}


def job_for(address: str, log_every_n_steps: int, epochs: int, workers: int) -> dict:
    return compose_job(
        f"cluster.address={address}",
        f"trainer.workers={workers}",
        f"trainer.epochs={epochs}",
        f"logger.log_every_n_steps={log_every_n_steps}",
        "logger.progress=none",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settings", default="default,off", help=f"of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}

    ray.init(
        address="local",
        num_cpus=max(4, args.workers),
        include_dashboard=False,
        logging_level="WARNING",
    )
    address = ray.get_runtime_context().gcs_address
    rates: dict[str, list[float]] = {name: [] for name in settings}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                order = list(settings) if rep % 2 == 0 else list(reversed(settings))
                for name in order:
                    job = job_for(address, settings[name], args.epochs, args.workers)
                    run_dir = RunDirectory(Path(tmp) / f"{rep}-{name}")
                    metrics = driver.train(job, run_dir)
                    rates[name].append(metrics["samples_per_s"])
                    print(
                        f"rep {rep} {name:<20} {metrics['samples_per_s']:>10,.0f} samples/s",
                        flush=True,
                    )
    finally:
        ray.shutdown()

    off = statistics.median(rates["off"])
    result = {
        "job": f"digits MLP, {args.workers} workers, {args.epochs} epochs, CPU",
        "reps": args.reps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "median_samples_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "ratio_to_off": {name: statistics.median(r) / off for name, r in rates.items()},
        "samples_per_s": rates,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

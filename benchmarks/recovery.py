"""Fault-tolerance figures: checkpoint size and write time, time from a killed worker to training
again, and how far the recovered run's final parameters are from an uninterrupted run's.

    python benchmarks/recovery.py            # ~2 minutes on 2 cores

One embedded Ray (4 logical CPUs) for everything; the recovered run goes through the real CLI
joined to it, and its worker is killed with SIGKILL by pid after the first checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from distrain import checkpoint, driver
from distrain.checkpoint import CheckpointStore
from distrain.cli import compose_job
from distrain.rundir import RunDirectory

JOB = ["trainer.epochs=20", "trainer.checkpoint_every_n_steps=10", "logger.progress=none"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="distrain-recovery-"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        reference = RunDirectory(work / "reference")
        driver.train(compose_job(*JOB), reference)
        latest = checkpoint.load(CheckpointStore(reference.checkpoints, keep=3).latest())
        shards = [read() for read in latest.shards]
        store = CheckpointStore(work / "timing", keep=1)
        write_s = []
        for _ in range(5):
            started = time.perf_counter()
            store.save(latest.meta, [lambda shard=shard: shard for shard in shards])
            write_s.append(time.perf_counter() - started)

        run_dir = work / "killed"
        cli = [sys.executable, "-m", "distrain", *JOB, f"hydra.run.dir={run_dir}"]
        address = f"cluster.address={ray.get_runtime_context().gcs_address}"
        proc = subprocess.Popen([*cli, address], stderr=subprocess.PIPE, text=True)
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        pid = json.loads((run_dir / "workers.json").read_text())["workers"][1]["pid"]
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        stderr = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, stderr[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # Training again = the new group's workers.json written (all ranks set up, resuming).
        again_s = (run_dir / "workers.json").stat().st_mtime - killed_at

        final = torch.load(run_dir / "model.pt", weights_only=True)
        expected = torch.load(reference.model_path, weights_only=True)
        max_diff = max((final[k] - expected[k]).abs().max().item() for k in expected)
        # A checkpoint is a directory: the JSON index and one safetensors shard per rank.
        size_mb = sum(f.stat().st_size for f in latest.path.iterdir()) / 1e6
        print(f"checkpoint: {size_mb:.2f} MB ({latest.path.name}, {len(shards)} shards)")
        print(f"checkpoint write: median {statistics.median(write_s) * 1e3:.1f} ms over 5")
        print(
            f"killed worker -> training again: {again_s:.1f} s "
            f"(of which restart after detection: {metrics['failures'][0]['recovery_s']:.1f} s); "
            f"downtime from the last step before the kill to the next logged step: "
            f"{metrics['failures'][0]['downtime_s']:.1f} s"
        )
        print(
            f"restarts {metrics['restarts']}, steps {metrics['steps']}, "
            f"max |resumed - uninterrupted| parameter difference: {max_diff:.3g}"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

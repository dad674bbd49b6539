"""One distrain run on a benchmark workload in a fresh process; prints one JSON line like a peer.

    python benchmarks/distrain_bench.py --workload cnn --workers 2 --strategy ps_sync \
        [--warmup-steps 20] [--measure-steps 30] [--t0 EPOCH_SECONDS]

The job goes through distrain's own driver (`driver.train`) with an embedded Ray started by it,
so start-up is counted as for the Ray peers. The quantities are those of `peers/common.py`:

* `samples_per_s`: steady state, from the driver's own per-interval records in TensorBoard
  (`throughput/samples_per_s`, one per `LOG_EVERY` steps): the intervals after `warmup_steps`, total
  samples over total time. Epoch-end evaluation is not inside any interval (the peers have none).
* `time_to_first_step_s`: t0 to the first aggregated gradient of the slowest rank (the
  aggregator's `first_step_unix_s`; the optimizer step follows at once).
* `peak_rss_mb`: the largest peak RSS of the driver, the workers and the parameter servers.
* `final_loss`: the last interval's mean training loss over the workers (`LOG_EVERY` steps).
"""

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The repo root on sys.path, so `benchmarks` and `distrain` import when run as a script (Ray's
# workers inherit the driver's sys.path for the `_target_`s in benchmarks/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distrain import forked_workers
from distrain.__main__ import starts_embedded_ray

# As the `distrain` command does first (distrain/__main__.py): the fork server's imports begin
# now, beside this script's own imports and the job's composition.
if starts_embedded_ray(sys.argv[1:]):
    forked_workers.start_ahead()

from benchmarks.workload_specs import SPECS, WORKLOADS, job_overrides
from distrain import driver
from distrain.cli import compose_job
from distrain.rundir import RunDirectory

LOG_EVERY = 10  # steps per driver record: the resolution of the steady-state window
STRATEGIES = {
    "allreduce": ["aggregator=allreduce"],
    "allreduce_fp16": ["aggregator=allreduce", "aggregator.compression=fp16"],
    "allreduce_gloo": ["aggregator=allreduce", "aggregator.transport=backend"],
    "ps_sync": ["aggregator=parameter_server", "aggregator.servers=2"],
    "ps_async": ["aggregator=parameter_server", "aggregator.servers=2", "aggregator.mode=async"],
}


def steady_samples_per_s(
    run_dir: Path, *, warmup: int, steps_per_epoch: int, global_batch: int
) -> tuple[float, float]:
    """Samples over time of the intervals after `warmup` steps, and the last interval's loss.

    An interval ends at a record and starts at the previous record or at its epoch's start
    (the loop restarts its interval clock every epoch).
    """
    # Imported here, after the run: this process imports nothing heavy before the job starts.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    rates = events.Scalars("throughput/samples_per_s")
    samples = seconds = 0.0
    previous = 0
    for record in rates:
        end = record.step
        start = max(previous, (end - 1) // steps_per_epoch * steps_per_epoch)
        previous = end
        if start < warmup:
            continue
        interval_samples = (end - start) * global_batch
        samples += interval_samples
        seconds += interval_samples / record.value
    return samples / seconds, events.Scalars("loss/train")[-1].value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workload", choices=WORKLOADS, default="digits_mlp")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="allreduce")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-per-worker", type=int, default=None, help="default: workload's")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--measure-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t0", type=float, default=None, help="epoch seconds of the launch command")
    p.add_argument(
        "--set", action="append", default=[], help="an extra override, e.g. trainer.device=cuda"
    )
    args = p.parse_args()
    t0 = args.t0 or time.time()
    spec = SPECS[args.workload]
    batch = args.batch_per_worker or spec.batch_per_worker
    global_batch = batch * args.workers
    steps = args.warmup_steps + args.measure_steps
    steps_per_epoch = spec.train_samples // global_batch
    job = compose_job(
        *STRATEGIES[args.strategy],
        f"trainer.workers={args.workers}",
        f"trainer.epochs={math.ceil(steps / steps_per_epoch)}",
        f"trainer.max_steps={steps}",
        f"trainer.seed={args.seed}",
        f"logger.log_every_n_steps={LOG_EVERY}",
        "logger.progress=none",
        # The peers write no checkpoints; distrain writes its first and its last.
        "trainer.checkpoint_min_interval_s=3600",
        *args.set,
    )
    job.update(job_overrides(args.workload, args.seed))
    job["data"]["batch_size"] = global_batch
    with tempfile.TemporaryDirectory() as tmp:
        metrics = driver.train(job, RunDirectory(Path(tmp)))
        rate, final_loss = steady_samples_per_s(
            Path(tmp),
            warmup=args.warmup_steps,
            steps_per_epoch=steps_per_epoch,
            global_batch=global_batch,
        )
    ranks = metrics["aggregator"]
    servers = ranks[0].get("per_server", [])
    row: dict[str, Any] = {
        "name": f"distrain_{args.strategy}",
        "workload": args.workload,
        "workers": args.workers,
        "batch_per_worker": batch,
        "steps": metrics["steps"],
        "samples_per_s": rate,
        "time_to_first_step_s": max(r["first_step_unix_s"] for r in ranks) - t0,
        "peak_rss_mb": max(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
            + [r["peak_rss_mb"] for r in ranks]
            + [s["peak_rss_mb"] for s in servers]
        ),
        "final_loss": final_loss,
    }
    keys = ("transport", "allreduce_payload_bytes_per_step", "pushed_bytes_per_step", "dropped")
    for key in keys:
        if key in ranks[0]:
            row[key] = ranks[0][key]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()

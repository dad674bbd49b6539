"""Peer baseline 4: Ray Train `TorchTrainer` (DDP over gloo) on an embedded local Ray.

Ray Train v2 (the default in this Ray) has a controller actor that polls the worker group
every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds (default 2.0). We run with the default; the
poll only delays noticing that training finished, not the steps measured inside the workers.
"""

import os
import socket
import sys
import tempfile
from pathlib import Path

# Repo root on sys.path so `benchmarks` imports when this file is run as a script
# (Ray passes the driver's sys.path on to its workers).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.peers import common
from benchmarks.workloads import make_workload


def train_fn(config: dict) -> dict[str, float]:
    """Per-worker loop; returns (on rank 0 that becomes Result.return_value) the metrics."""
    torch.set_num_threads(config["threads"])
    wl = make_workload(config["workload"], config["seed"])
    batch = config["batch"]
    model = ray.train.torch.prepare_model(wl.model_fn())
    opt = torch.optim.SGD(model.parameters(), lr=wl.lr)
    loader = DataLoader(
        TensorDataset(wl.x_train, wl.y_train), batch_size=batch, shuffle=True, drop_last=True
    )
    loader = ray.train.torch.prepare_data_loader(loader)  # swaps in a DistributedSampler
    clock = common.StepClock(config["t0"], config["warmup"], config["measure"])
    done, epoch = False, 0
    while not done:
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if done := clock.tick(loss.item()):
                break
        epoch += 1
    # Ray Train already runs a gloo process group; use it to combine the ranks' numbers.
    sums = torch.tensor([clock.samples_per_s(batch), clock.final_loss()], dtype=torch.float64)
    maxes = torch.tensor([clock.first_step_s, common.peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    metrics = {
        "samples_per_s": sums[0].item(),
        "final_loss": sums[1].item() / dist.get_world_size(),
        "time_to_first_step_s": maxes[0].item(),
        "peak_rss_mb": maxes[1].item(),
    }
    # Reported once at the end: report() is a barrier across workers, so per-step reports
    # would measure Ray's reporting rather than training.
    ray.train.report(metrics)
    return metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = common.parse_args(__doc__)
    t0 = args.t0 or common.process_start_time()
    wl_batch = common.batch_size(args, make_workload(args.workload, args.seed))
    # Ray Train's PlacementGroupCleaner asks the State API whether the controller is alive. With
    # no address that API picks the machine's latest `ray start` cluster, which on a shared machine
    # can be someone else's: the controller is "not found", our placement group is removed and
    # the run dies. So pin the State API (env inherited by Ray's processes) to our own dashboard.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # address="local": always start a private embedded Ray, never join someone's RAY_ADDRESS.
    ray.init(address="local", num_cpus=args.workers, dashboard_port=port)
    try:
        with tempfile.TemporaryDirectory() as storage:  # keep run artifacts out of ~/ray_results
            trainer = ray.train.torch.TorchTrainer(
                train_fn,
                train_loop_config={
                    "workload": args.workload,
                    "seed": args.seed,
                    "batch": wl_batch,
                    "threads": args.threads_per_worker,
                    "t0": t0,
                    "warmup": args.warmup_steps,
                    "measure": args.measure_steps,
                },
                scaling_config=ray.train.ScalingConfig(
                    num_workers=args.workers, use_gpu=False, resources_per_worker={"CPU": 1}
                ),
                run_config=ray.train.RunConfig(storage_path=storage, name="ray_train_peer"),
            )
            metrics = trainer.fit().return_value
    finally:
        ray.shutdown()
    metrics["peak_rss_mb"] = max(metrics["peak_rss_mb"], common.peak_rss_mb())  # + driver
    print(common.result("ray_train", args, wl_batch, **metrics))


if __name__ == "__main__":
    main()

"""Peer baseline 3: torch DDP (gloo) with DistributedSampler + DataLoader, under torchrun.

Launch: torchrun --standalone --nproc_per_node=N benchmarks/peers/torchrun_ddp.py --workers N ...
Rank 0 prints the JSON line; samples/s is summed and peak RSS maxed over ranks.
With `--device cuda` (benchmarks/gpu_check.py): NCCL, one GPU per rank (LOCAL_RANK), batches
copied from pinned memory, as the PyTorch DDP tutorial does it.
"""

import os
import sys
from pathlib import Path

# Repo root on sys.path so `benchmarks` imports when this file is run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from benchmarks.peers import common
from benchmarks.workloads import make_workload


def _reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    # NCCL reduces device tensors only.
    t = torch.tensor(
        values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else None
    )
    dist.all_reduce(t, op=op)
    return t.tolist()


def main() -> None:
    args = common.parse_args(__doc__)
    # Without --t0, count from the torchrun agent (our parent), which the user started.
    t0 = args.t0 or common.process_start_time(os.getppid())
    torch.set_num_threads(args.threads_per_worker)
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() != args.workers:
        raise SystemExit(f"--workers {args.workers} but torchrun started {dist.get_world_size()}")
    wl = make_workload(args.workload, args.seed)
    batch = common.batch_size(args, wl)
    model = wl.model_fn().to(device) if cuda else wl.model_fn()
    model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=wl.lr)
    dataset = TensorDataset(wl.x_train, wl.y_train)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, pin_memory=cuda)
    clock = common.StepClock(t0, args.warmup_steps, args.measure_steps)
    done, epoch = False, 0
    while not done:
        sampler.set_epoch(epoch)  # otherwise every epoch repeats the same order
        for x, y in loader:
            if cuda:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if done := clock.tick(loss.item()):
                break
        epoch += 1
    rate, loss_sum = _reduce([clock.samples_per_s(batch), clock.final_loss()], dist.ReduceOp.SUM)
    first, rss = _reduce([clock.first_step_s, common.peak_rss_mb()], dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(
            common.result(
                "torchrun_ddp",
                args,
                batch,
                samples_per_s=rate,
                time_to_first_step_s=first,
                peak_rss_mb=rss,
                final_loss=loss_sum / args.workers,
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

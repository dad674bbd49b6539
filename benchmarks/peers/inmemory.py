"""Peer baseline 2: single process, batches sliced from a randperm of the in-memory tensors."""

import sys
from pathlib import Path

# Repo root on sys.path so `benchmarks` imports when this file is run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.nn import functional as F

from benchmarks.peers import common
from benchmarks.workloads import make_workload


def main() -> None:
    args = common.parse_args(__doc__)
    t0 = args.t0 or common.process_start_time()
    torch.set_num_threads(args.threads_per_worker)
    wl = make_workload(args.workload, args.seed)
    batch = common.batch_size(args, wl)
    model = wl.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=wl.lr)
    n = len(wl.x_train)
    clock = common.StepClock(t0, args.warmup_steps, args.measure_steps)
    done = False
    while not done:
        perm = torch.randperm(n)
        # Full batches only, so every step trains exactly `batch` samples.
        for start in range(0, n - batch + 1, batch):
            idx = perm[start : start + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(wl.x_train[idx]), wl.y_train[idx])
            loss.backward()
            opt.step()
            if done := clock.tick(loss.item()):
                break
    print(
        common.result(
            "inmemory",
            args,
            batch,
            samples_per_s=clock.samples_per_s(batch),
            time_to_first_step_s=clock.first_step_s,
            peak_rss_mb=common.peak_rss_mb(),
            final_loss=clock.final_loss(),
        )
    )


if __name__ == "__main__":
    main()

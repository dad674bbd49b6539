"""Peer baseline for the LM workload: nanoGPT's training loop, plain or under torchrun (DDP).

Random windows from a memmapped token file, AdamW, the same GPT as distrain's (plain torch).
    python benchmarks/peers/nanogpt_loop.py --data DIR [--batch-per-worker 16 ...]
    torchrun --standalone --nproc_per_node=2 benchmarks/peers/nanogpt_loop.py --data DIR
Prints one JSON line (rank 0): tokens/s summed over ranks, steady state after the warm-up.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmarks.lm_workload import LM, make_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-per-worker", type=int, default=LM.batch_per_worker)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--measure-steps", type=int, default=40)
    p.add_argument("--threads-per-worker", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads_per_worker)
    ddp = int(os.environ.get("RANK", -1)) != -1  # nanoGPT's one detection line
    if ddp:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(0)
    model = make_model()
    if ddp:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM.lr)
    data = np.memmap(args.data / "train.bin", dtype=np.uint8, mode="r")
    generator = torch.Generator().manual_seed(1 + rank)
    block, batch = LM.block_size, args.batch_per_worker

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block - 1, (batch,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        return x, y

    start = 0.0
    for step in range(args.warmup_steps + args.measure_steps):
        if step == args.warmup_steps:
            start = time.perf_counter()
        x, y = get_batch()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss_value = loss.item()
    tokens_per_s = args.measure_steps * batch * block / (time.perf_counter() - start)
    if ddp:
        total = torch.tensor([tokens_per_s])
        dist.all_reduce(total)
        tokens_per_s = total.item()
        dist.destroy_process_group()
    if rank == 0:
        name = "torchrun_ddp_nanogpt" if ddp else "nanogpt_loop"
        row = {
            "name": name,
            "workers": world,
            "tokens_per_s": tokens_per_s,
            "final_loss": loss_value,
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()

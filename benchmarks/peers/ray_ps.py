"""Peer baseline 5: the synchronous single-actor parameter server of Ray's docs example.

Structure follows the "Parameter Server" example: a `ParameterServer` actor whose
`apply_gradients(*gradients)` combines the workers' gradients, steps its optimizer and returns
the new weights; `DataWorker` actors whose `compute_gradients(weights)` loads the weights, runs
one batch and returns gradients; a driver loop chaining the two with object refs. Weights and
gradients travel as numpy arrays. Deviations: gradients are averaged (the example sums) so the
update matches DDP's, and the workers keep their losses for `final_loss`.
"""

import sys
import warnings
from pathlib import Path

# Repo root on sys.path so `benchmarks` imports when this file is run as a script
# (Ray passes the driver's sys.path on to its workers).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import ray
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.peers import common
from benchmarks.workload_specs import SPECS
from benchmarks.workloads import make_workload, model_builder


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})


@ray.remote
class ParameterServer:
    def __init__(self, workload: str, seed: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model_builder(workload, seed)()  # a server holds no data
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=SPECS[workload].lr)

    def apply_gradients(self, *gradients: list[np.ndarray]) -> dict[str, np.ndarray]:
        mean_grads = [np.stack(g).mean(axis=0) for g in zip(*gradients, strict=True)]
        self.optimizer.zero_grad()
        for p, g in zip(self.model.parameters(), mean_grads, strict=True):
            p.grad = torch.from_numpy(g)
        self.optimizer.step()
        return get_weights(self.model)

    def get_weights(self) -> dict[str, np.ndarray]:
        return get_weights(self.model)

    def peak_rss_mb(self) -> float:
        return common.peak_rss_mb()


@ray.remote
class DataWorker:
    def __init__(self, workload: str, seed: int, rank: int, batch: int, threads: int) -> None:
        torch.set_num_threads(threads)
        # Weights arrive as read-only object-store arrays; load_state_dict only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        wl = make_workload(workload, seed)
        self.model = wl.model_fn()
        self.x, self.y, self.batch = wl.x_train, wl.y_train, batch
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)  # own shuffle per worker
        self.batches = iter(())
        self.losses: list[float] = []

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = next(self.batches, None)
        if idx is None:  # epoch ended: start a new one
            perm = torch.randperm(len(self.x), generator=self.gen)
            self.batches = iter(perm[: len(perm) // self.batch * self.batch].split(self.batch))
            idx = next(self.batches)
        return self.x[idx], self.y[idx]

    def compute_gradients(self, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        set_weights(self.model, weights)
        x, y = self._next_batch()
        self.model.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.losses.append(loss.item())
        return [p.grad.numpy() for p in self.model.parameters()]

    def stats(self) -> tuple[float, float]:
        last = self.losses[-common.LOSS_WINDOW :]
        return sum(last) / len(last), common.peak_rss_mb()


def main() -> None:
    args = common.parse_args(__doc__)
    t0 = args.t0 or common.process_start_time()
    batch = common.batch_size(args, make_workload(args.workload, args.seed))
    # address="local": always start a private embedded Ray, never join someone's RAY_ADDRESS.
    ray.init(address="local", num_cpus=args.workers)
    try:
        cfg = (args.workload, args.seed)
        ps = ParameterServer.remote(*cfg, args.threads_per_worker)
        workers = [
            DataWorker.remote(*cfg, rank, batch, args.threads_per_worker)
            for rank in range(args.workers)
        ]
        current_weights = ps.get_weights.remote()
        # Steps chain through object refs as in the docs' loop; we only wait (ray.get) at the
        # first, last-warm-up and last step, the only step times StepClock uses.
        clock = common.StepClock(t0, args.warmup_steps, args.measure_steps)
        marks = {1, args.warmup_steps, args.warmup_steps + args.measure_steps}
        for step in range(1, args.warmup_steps + args.measure_steps + 1):
            gradients = [w.compute_gradients.remote(current_weights) for w in workers]
            current_weights = ps.apply_gradients.remote(*gradients)
            if step in marks:
                ray.get(current_weights)
            clock.tick(0.0)
        stats = ray.get([w.stats.remote() for w in workers])
        rss = max([common.peak_rss_mb(), ray.get(ps.peak_rss_mb.remote())] + [s[1] for s in stats])
    finally:
        ray.shutdown()
    print(
        common.result(
            "ray_ps",
            args,
            batch,
            samples_per_s=clock.samples_per_s(batch * args.workers),
            time_to_first_step_s=clock.first_step_s,
            peak_rss_mb=rss,
            final_loss=sum(s[0] for s in stats) / len(stats),
        )
    )


if __name__ == "__main__":
    main()

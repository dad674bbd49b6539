"""The benchmark workloads' sizes and settings, without torch.

`workloads.py` builds the data and models (torch, scikit-learn); what a launcher needs before
training (how many training samples, the batch per worker, the learning rate) lives here, so
that distrain's benchmark process imports no torch before it starts the job, as the `distrain`
command does not. Its start-up is then measured as a user's command would see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkloadSpec:
    train_samples: int  # every sample trains (the peers have no validation split)
    batch_per_worker: int  # the default per-worker batch size
    lr: float


SPECS = {
    "digits_mlp": WorkloadSpec(train_samples=1797, batch_per_worker=32, lr=0.05),  # sklearn's
    "mlp6m": WorkloadSpec(train_samples=8192, batch_per_worker=128, lr=0.01),
    "cnn": WorkloadSpec(train_samples=4096, batch_per_worker=64, lr=0.01),
    "resnet18": WorkloadSpec(train_samples=4096, batch_per_worker=128, lr=0.05),
}
WORKLOADS = tuple(SPECS)


def job_overrides(name: str, seed: int = 0) -> dict[str, Any]:
    """The job groups that make a distrain run train workload `name` like the peers do (its
    data and model are the `_target_`s of `distrain_workloads.py`)."""
    spec = SPECS[name]
    builders = "benchmarks.distrain_workloads"
    return {
        "data": {
            "_target_": f"{builders}.splits",
            "name": name,
            "seed": seed,
            "batch_size": spec.batch_per_worker,  # times the workers, by the caller
            "micro_batch_size": None,
            "loader": "memory",
            "num_workers": 0,
        },
        "model": {"_target_": f"{builders}.model", "name": name, "seed": seed},
        # The peers' optimizer: plain SGD at the workload's lr.
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": spec.lr},
    }

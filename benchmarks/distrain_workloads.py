"""The benchmark workloads (`workloads.py`) as distrain `_target_`s: a dataset builder and a model.

distrain trains on exactly the peers' data and initial weights: every sample of `x_train` is a
training sample (the peers have no validation split) and validation reads the first
`val_samples` of them, only so that distrain's epoch report has something to evaluate.
"""

from __future__ import annotations

from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.workloads import make_workload, model_builder
from distrain.data.base import Splits


def splits(name: str, seed: int = 0, val_samples: int = 256) -> Splits:
    workload = make_workload(name, seed)
    x, y = workload.x_train, workload.y_train
    return Splits(
        train=TensorDataset(x, y),
        val=TensorDataset(x[:val_samples], y[:val_samples]),
        input_shape=tuple(x.shape[1:]),
        num_outputs=10,
    )


def model(name: str, seed: int = 0) -> nn.Module:
    # The model alone: building the workload's data here would cost every worker what the
    # driver already did (for digits, importing scikit-learn and reading its files).
    return model_builder(name, seed)()

"""scikit-learn's embedded datasets: no download, the default job's data."""

from __future__ import annotations

import torch
from sklearn import datasets

from distrain.data.base import Splits, tensor_splits


def _standardize(x: torch.Tensor) -> torch.Tensor:
    # Per-feature z-score; constant features (digits has a few) stay at zero, not NaN.
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def digits(val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """8x8 handwritten digits, 1,797 samples, 64 features, 10 classes."""
    bunch = datasets.load_digits()
    x = _standardize(torch.tensor(bunch.data, dtype=torch.float32))
    y = torch.tensor(bunch.target, dtype=torch.long)
    return tensor_splits(x, y, val_fraction=val_fraction, seed=seed, num_outputs=10)


def iris(val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Fisher's iris, 150 samples, 4 features, 3 classes."""
    bunch = datasets.load_iris()
    x = _standardize(torch.tensor(bunch.data, dtype=torch.float32))
    y = torch.tensor(bunch.target, dtype=torch.long)
    return tensor_splits(x, y, val_fraction=val_fraction, seed=seed, num_outputs=3)


def blobs(
    num_samples: int = 1000,
    centers: int = 2,
    num_features: int = 2,
    cluster_std: float = 1.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Splits:
    """Gaussian point clusters from `make_blobs`; `cluster_std` is the noise."""
    x_np, y_np = datasets.make_blobs(
        n_samples=num_samples,
        centers=centers,
        n_features=num_features,
        cluster_std=cluster_std,
        random_state=seed,
    )
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    return tensor_splits(x, y, val_fraction=val_fraction, seed=seed, num_outputs=centers)

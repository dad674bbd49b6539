"""Datasets and a transform from outside distrain, as a user would write them (`data=dataset`).

Each Dataset is a plain map-style `torch.utils.data.Dataset` named by `_target_`; the CLI tests
run them through the real driver and workers, so the workers import this module as they would a
user's package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from distrain.data.base import Splits, tensor_splits


def _clusters(num_samples: int, num_features: int, num_classes: int, seed: int):
    """Gaussian clusters around fixed random centres: learnable, labels 0..num_classes-1."""
    gen = torch.Generator().manual_seed(1000 + seed)
    centres = 3 * torch.randn(num_classes, num_features, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(num_samples) % num_classes
    x = centres[labels] + torch.randn(num_samples, num_features, generator=gen)
    return x, labels


class Clusters(Dataset):
    """Classification with no `classes` or `targets` attribute: labels are read one by one."""

    def __init__(
        self, num_samples: int = 256, num_features: int = 8, num_classes: int = 3, seed: int = 0
    ) -> None:
        self.x, self.labels = _clusters(num_samples, num_features, num_classes, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.labels[index])  # a Python int, as many datasets return


class CountedClusters(Clusters):
    """Clusters that note each process building them: a line with its pid in `builds_file`."""

    def __init__(self, builds_file: str, num_samples: int = 256) -> None:
        with Path(builds_file).open("a") as builds:
            builds.write(f"{os.getpid()}\n")
        super().__init__(num_samples)


def counted_in_memory_clusters(builds_file: str, num_samples: int = 256) -> Splits:
    """The same clusters as in-memory tensors (a dataset builder), noting each build likewise."""
    with Path(builds_file).open("a") as builds:
        builds.write(f"{os.getpid()}\n")
    x, labels = _clusters(num_samples, num_features=8, num_classes=3, seed=0)
    return tensor_splits(x, labels, val_fraction=0.25, seed=0, num_outputs=3)


class NamedClusters(Clusters):
    """torchvision's convention: a `classes` attribute (here more classes than labels used)."""

    classes = ("a", "b", "c", "d", "e")


class Waves(Dataset):
    """Regression: a (2,) float64 numpy-free target, a fixed linear map of the input."""

    def __init__(self, num_samples: int = 128, num_features: int = 4) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(num_samples, num_features, generator=gen)
        self.y = (self.x @ torch.randn(num_features, 2, generator=gen)).double()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise IndexError(index)


class Dicts(Clusters):
    """Items as dicts, which distrain does not take (it needs (input, target) pairs)."""

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        return {"x": self.x[index], "y": int(self.labels[index])}


class NotADataset:
    """Has __len__ and __getitem__ but is not a torch Dataset."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(2), 0


class GaussianNoise:
    """A user's random transform: Gaussian noise on every input value."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


class AddOffset:
    """A user's transform: adds `offset` to every input value (a mark a test can see)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset

    def __repr__(self) -> str:
        return f"AddOffset({self.offset})"

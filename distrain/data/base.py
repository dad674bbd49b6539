"""What every dataset builder returns: train/val splits plus the shapes the model needs.

A builder is any callable (named by `_target_` in `conf/data/*.yaml`) that returns `Splits`.
When both splits are `TensorDataset`s the worker keeps them as tensors on its device and batches
by indexing a permutation (airbench style, no per-sample `__getitem__`); otherwise it falls back
to a `DataLoader` with worker processes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

# language_model: inputs (B, T) token ids, targets the same windows shifted by one token.
TASKS = ("classification", "regression", "language_model")

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Splits:
    """A dataset as the framework sees it.

    `num_outputs` is the number of classes for classification and the target width for
    regression. `input_shape` None: measured on training sample 0 as the model sees it (after
    the transforms). `train_transform` / `val_transform` (optional) are applied to each *batch*
    of inputs on the worker's device (in-memory data; `data.train_transforms` set them); they
    must be picklable callables.
    """

    train: Dataset
    val: Dataset
    input_shape: tuple[int, ...] | None
    num_outputs: int
    task: str = "classification"  # or "regression", or "language_model" (distrain/data/tokens.py)
    train_transform: BatchTransform | None = None
    val_transform: BatchTransform | None = None

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorDataset) and isinstance(self.val, TensorDataset)

    @property
    def tensor_bytes(self) -> int:
        """Bytes held by in-memory splits (0 for datasets read as they go)."""
        if not self.in_memory:
            return 0
        datasets = (self.train, self.val)
        return sum(t.nbytes for d in datasets for t in d.tensors)  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")


@dataclass
class SharedSplits:
    """In-memory splits as numpy arrays, to go through Ray's object store: a process reading
    numpy arrays from it maps the node's one copy (zero-copy, read-only), where torch tensors
    would be unpickled into a copy per process. `open()` gives the Splits back, as tensors on
    that shared memory: never written in place (batches are gathered copies of rows)."""

    train: list[Any]  # numpy arrays: the TensorDataset's tensors
    val: list[Any]
    rest: dict[str, Any]  # the other Splits fields

    @classmethod
    def of(cls, splits: Splits) -> SharedSplits | None:
        """None unless the splits are in memory in dtypes numpy has (not bfloat16)."""
        if not splits.in_memory:
            return None
        tensors = [*splits.train.tensors, *splits.val.tensors]  # type: ignore[attr-defined]
        try:
            arrays = [t.detach().cpu().numpy() for t in tensors]
        except TypeError:
            return None
        count = len(splits.train.tensors)  # type: ignore[attr-defined]
        rest = {f.name: getattr(splits, f.name) for f in dataclasses.fields(Splits)}
        del rest["train"], rest["val"]
        return cls(arrays[:count], arrays[count:], rest)

    def open(self) -> Splits:
        with warnings.catch_warnings():  # "not writable": they are not written to (see above)
            warnings.simplefilter("ignore", UserWarning)
            tensors = [torch.from_numpy(a) for a in [*self.train, *self.val]]
        count = len(self.train)
        return Splits(
            train=TensorDataset(*tensors[:count]), val=TensorDataset(*tensors[count:]), **self.rest
        )


def tensor_splits(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    val_fraction: float,
    seed: int,
    num_outputs: int,
    task: str = "classification",
) -> Splits:
    """Split in-memory features/labels into train/val with a seeded permutation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    num_val = max(1, round(len(x) * val_fraction))
    val_idx, train_idx = order[:num_val], order[num_val:]
    return Splits(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        input_shape=tuple(x.shape[1:]),
        num_outputs=num_outputs,
        task=task,
    )

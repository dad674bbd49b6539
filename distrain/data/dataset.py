"""Your own dataset: any map-style `torch.utils.data.Dataset` named by `_target_` (`data=dataset`).

`data.train`, and `data.val` or else a seeded `data.val_fraction` of train, are built at the
driver's dry build and again in every worker (so the class must import there too: installed, or
on PYTHONPATH). Each item is an (input, target) pair. What the model needs is read from the data,
and each can be set instead:

* `data.task`: training sample 0's target: an integer -> classification, floats -> regression;
* `data.num_outputs`: for classification the dataset's `classes` attribute (torchvision's
  convention), else its `targets` attribute, else every target read one by one when the datasets
  hold at most `SCAN_LIMIT` samples (max label + 1); for regression the target's width;
* `data.input_shape`: training sample 0's input after `data.train_transforms` (measured by
  `transforms.attach`).

The log says what was inferred and from what. The datasets go through the DataLoader path, with
the same sharding as every other dataset.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import Dataset, IterableDataset, Subset

from distrain.config import ConfigError
from distrain.data.base import Splits

log = logging.getLogger("distrain")
SCAN_LIMIT = 10_000  # samples: above this, reading every target to count classes is too slow
TASKS = ("classification", "regression")


def locate(target: Any, where: str, advice: str) -> Any:
    """The object at import path `target`, or a one-paragraph ConfigError (with close names)."""
    module_name, _, name = str(target).rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError as error:
        raise ConfigError(
            f"{where}._target_={target!r} does not import: {error}. {advice}"
        ) from None
    if module is None or not hasattr(module, name):
        close = difflib.get_close_matches(name, dir(module), n=3) if module else []
        hint = f" (did you mean {', '.join(f'{module_name}.{c}' for c in close)}?)" if close else ""
        raise ConfigError(
            f"{where}._target_={target!r} does not exist: module {module_name or '(none)'!r} "
            f"has no {name!r}{hint}. {advice}"
        )
    return getattr(module, name)


def sample_pair(dataset: Dataset, what: str) -> tuple[Any, Any]:
    """Sample 0 of `dataset`, checked to be an (input, target) pair."""
    if len(dataset) == 0:
        raise ConfigError(f"{what} is empty (len 0): it needs at least one sample.")
    try:
        sample = dataset[0]
    except Exception as error:
        raise ConfigError(
            f"reading sample 0 of {what} failed: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        shown = f"a {type(sample).__name__}" + (
            f" of {len(sample)} items" if isinstance(sample, tuple | list) else ""
        )
        if isinstance(sample, dict):
            shown += f" with keys {sorted(map(str, sample))}"
        raise ConfigError(
            f"sample 0 of {what} is {shown}; distrain needs (input, target) pairs: return "
            "`x, y` from __getitem__."
        )
    return sample[0], sample[1]


class Pairs(Dataset):
    """The user's items as the loss takes them: a class index (long), or a float32 target
    vector (a scalar becomes shape (1,), matching a model with num_outputs=1); numpy inputs
    become tensors."""

    def __init__(self, dataset: Dataset, task: str) -> None:
        self.dataset, self.task = dataset, task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        x, y = self.dataset[index]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        y = torch.as_tensor(y)
        return x, (y.long().reshape(()) if self.task == "classification" else y.float().reshape(-1))


def _build(spec: Any, key: str) -> Dataset:
    if isinstance(spec, dict):
        if "_target_" not in spec:
            raise ConfigError(
                f"{key}={spec} names no class: set {key}._target_=my_package.MyDataset (a "
                "torch.utils.data.Dataset; its arguments as +{key}.<name>=<value>)."
            )
        locate(
            spec["_target_"],
            key,
            "Name your Dataset class by its import path, e.g. my_package.data.MyDataset "
            "(installed or on PYTHONPATH, for the workers too).",
        )
        try:
            spec = instantiate(spec, _convert_="all")
        except Exception as error:
            cause = error.__cause__ or error
            raise ConfigError(
                f"{key}._target_={spec['_target_']} could not be built: {type(cause).__name__}: "
                f"{cause} (its arguments are given as +{key}.<name>=<value>)."
            ) from None
    if isinstance(spec, IterableDataset) or not isinstance(spec, Dataset):
        kind = "an IterableDataset" if isinstance(spec, IterableDataset) else type(spec).__name__
        raise ConfigError(
            f"{key} built {kind} ({type(spec).__module__}.{type(spec).__name__}), not a map-style "
            "torch.utils.data.Dataset: subclass Dataset and define __len__ and __getitem__ "
            "returning (input, target)."
        )
    return spec


def _infer_task(y: Any, what: str) -> str:
    try:
        target = torch.as_tensor(y)
    except Exception:
        target = None
    if target is None or target.dtype == torch.bool or target.is_complex():
        raise ConfigError(
            f"the target of sample 0 of {what} is {y!r} ({type(y).__name__}): targets must be a "
            "class index (int) for classification or numbers (float, float tensor) for "
            "regression; map labels to indices in __getitem__, or set data.task."
        )
    if target.is_floating_point():
        return "regression"
    if target.numel() != 1:
        raise ConfigError(
            f"the target of sample 0 of {what} is an integer tensor of shape "
            f"{tuple(target.shape)}: classification takes one class index per sample; set "
            "data.task=regression for vector targets."
        )
    return "classification"


def _check_class_index(y: Any, what: str) -> None:
    """data.task=classification: the target must be one whole number (cross-entropy's index)."""
    target = torch.as_tensor(y)
    if target.numel() != 1 or (target.is_floating_point() and target != target.round()):
        raise ConfigError(
            f"data.task=classification, but the target of sample 0 of {what} is {y!r}: a class "
            "index is one whole number per sample (or set data.task=regression)."
        )


def _num_classes(train: Dataset, val: Dataset | None, num_samples: int) -> tuple[int, str]:
    """Number of classes, and where it came from (for the log)."""
    classes = getattr(train, "classes", None)
    if isinstance(classes, Sequence) and len(classes) > 0:
        return len(classes), "the dataset's `classes` attribute"
    sets = [train] if val is None else [train, val]
    targets = [getattr(d, "targets", None) for d in sets]
    if all(t is not None and len(t) > 0 for t in targets):
        labels = torch.cat([torch.as_tensor(t).reshape(-1) for t in targets])
        where = "the `targets` attribute"
    elif num_samples <= SCAN_LIMIT:
        labels = torch.stack(
            [torch.as_tensor(d[i][1]).reshape(()) for d in sets for i in range(len(d))]
        )
        where = f"reading every target ({num_samples} samples)"
    else:
        raise ConfigError(
            f"data.train has {num_samples} samples and neither a `classes` nor a `targets` "
            f"attribute, and reading every target to count the classes (done up to {SCAN_LIMIT} "
            "samples) would read the whole dataset: set data.num_outputs to the number of classes."
        )
    if labels.min() < 0:
        raise ConfigError(f"class labels must be >= 0, found {labels.min().item()} ({where}).")
    return int(labels.max().item()) + 1, where


def _split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1), or set data.val.")
    if len(dataset) < 2:
        raise ConfigError(
            f"data.train has {len(dataset)} sample(s); a train/val split needs at least 2 (or "
            "set data.val)."
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    num_val = min(len(dataset) - 1, max(1, round(len(dataset) * val_fraction)))
    return Subset(dataset, order[num_val:].tolist()), Subset(dataset, order[:num_val].tolist())


def user_dataset(
    train: Any,
    val: Any = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    task: str | None = None,
    num_outputs: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> Splits:
    """Splits of the user's Dataset(s): `train`/`val` are `_target_` configs or Datasets."""
    train_set = _build(train, "data.train")
    val_set = None if val is None else _build(val, "data.val")
    name = f"data.train ({type(train_set).__module__}.{type(train_set).__name__})"
    _, y = sample_pair(train_set, name)
    if val_set is not None:
        sample_pair(val_set, f"data.val ({type(val_set).__name__})")
    if task is not None and task not in TASKS:
        raise ConfigError(
            f"data.task={task!r} is not one of {', '.join(TASKS)} (or null: inferred)."
        )
    task_from = "data.task" if task else "training sample 0's target"
    task = task or _infer_task(y, name)
    if task == "classification":
        _check_class_index(y, name)
    num_samples = len(train_set) + (len(val_set) if val_set is not None else 0)
    if num_outputs is not None:
        outputs_from = "data.num_outputs"
    elif task == "classification":
        num_outputs, outputs_from = _num_classes(train_set, val_set, num_samples)
    else:
        num_outputs, outputs_from = torch.as_tensor(y).numel(), "the width of sample 0's target"
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"data.num_outputs={num_outputs} must be a whole number >= 1, or null.")

    if val_set is None:
        train_split, val_split = _split(Pairs(train_set, task), val_fraction, seed)
        val_from = f"data.val_fraction={val_fraction} of data.train, seed {seed}"
    else:
        train_split, val_split = Pairs(train_set, task), Pairs(val_set, task)
        val_from = "data.val"
    log.info(
        "data: %s: %d training / %d validation samples (%s); %s from %s; %d output(s) from %s",
        name, len(train_split), len(val_split), val_from, task, task_from, num_outputs,
        outputs_from,
    )  # fmt: skip
    return Splits(
        train=train_split,
        val=val_split,
        input_shape=tuple(input_shape) if input_shape is not None else None,
        num_outputs=num_outputs,
        task=task,
    )

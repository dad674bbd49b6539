"""Transform pipelines from config: `data.train_transforms` and `data.val_transforms`.

Each is a Hydra list of `_target_`s (torchvision's `transforms.v2`, or any callable of the
user's; a plain function that takes the input needs `_partial_: true`), applied in order to the
inputs only (targets pass unchanged):

* per batch on the worker's device when the data is in memory (tensors batched by indexing,
  `data.loader=auto|memory`): a transform sees an (N, ...) batch, so torchvision's random
  transforms draw one set of parameters per batch (`vision.RandomCropFlip` draws per sample),
  and it must keep the input shape (the model is built for it);
* per sample in the dataset's `__getitem__` otherwise, i.e. in the DataLoader's worker processes.

At the driver's dry build every entry is imported, built and run on sample 0 of each split, so a
`_target_` that does not import, a transform that refuses its arguments or fails on the data is a
ConfigError naming the entry, before any actor starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import Dataset

from distrain.config import ConfigError
from distrain.data.base import Splits
from distrain.data.dataset import locate, sample_pair

log = logging.getLogger("distrain")
KEYS = ("train_transforms", "val_transforms")  # of `conf/data/*.yaml`: not the builder's


class Pipeline:
    """The transforms of one config list, applied in order (a named, picklable Compose)."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]], key: str) -> None:
        self.steps = list(steps)
        self.key = key  # e.g. "data.train_transforms", for error messages

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x

    def checked(self, x: Any, what: str) -> Any:
        """`self(x)`, but a failing step becomes a ConfigError naming it (dry build only)."""
        for index, step in enumerate(self.steps):
            try:
                x = step(x)
            except Exception as error:
                raise ConfigError(
                    f"{self.key}[{index}] ({step!r}) failed on {what}: {type(error).__name__}: "
                    f"{error}"
                ) from None
        return x

    def __repr__(self) -> str:
        return f"Pipeline({self.key}: {', '.join(map(repr, self.steps))})"


class PerSample(Dataset):
    """A dataset whose inputs go through `transform` in `__getitem__` (in DataLoader workers)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[index]
        return self.transform(x), y


def build_pipeline(specs: Any, key: str) -> Pipeline | None:
    """The transforms listed under `key` (e.g. "data.train_transforms"); None for none."""
    if specs is None or (isinstance(specs, list | tuple) and not specs):
        return None
    if not isinstance(specs, list | tuple):
        raise ConfigError(
            f"{key}={specs!r} is not a list: it is a list of transforms, each naming a callable "
            f"by _target_, e.g. {key}=[{{_target_:torchvision.transforms.v2.RandomHorizontalFlip}}]"
            f", or {key}=[] for none."
        )
    return Pipeline([_build_step(spec, f"{key}[{i}]") for i, spec in enumerate(specs)], key)


def _build_step(spec: Any, where: str) -> Callable[[Any], Any]:
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ConfigError(
            f"{where}={spec!r} is not a transform: each entry names a callable by _target_, e.g. "
            "{_target_: torchvision.transforms.v2.RandomCrop, size: 32} (a function that takes "
            "the input also needs `_partial_: true`)."
        )
    locate(
        spec["_target_"],
        where,
        "A transform is named by its import path, e.g. torchvision.transforms.v2.RandomCrop or "
        "my_package.transforms.MyTransform (installed or on PYTHONPATH, for the workers too).",
    )
    try:
        step = instantiate(spec, _convert_="all")
    except Exception as error:
        cause = error.__cause__ or error
        arguments = {k: v for k, v in spec.items() if k != "_target_"}
        raise ConfigError(
            f"{where}: {spec['_target_']} could not be built with {arguments}: "
            f"{type(cause).__name__}: {cause} (a function that takes the input needs "
            "`_partial_: true`)."
        ) from None
    if not callable(step):
        raise ConfigError(
            f"{where}: {spec['_target_']} built a {type(step).__name__}, which cannot be called on "
            "an input; name a transform class, or a function with `_partial_: true`."
        )
    return step


def attach(
    splits: Splits, train: Pipeline | None, val: Pipeline | None, *, per_batch: bool
) -> Splits:
    """Put the pipelines where they run, check them on sample 0 of each split, and measure the
    input shape when the builder left it to the data (`input_shape=None`)."""
    train_shape = _checked_shape(splits.train, train, "training", per_batch)
    val_shape = _checked_shape(splits.val, val, "validation", per_batch)
    declared = None if splits.input_shape is None else tuple(splits.input_shape)
    if declared is None:
        splits.input_shape = train_shape
        log.info("data: input shape %s, measured on training sample 0", train_shape)
    elif not per_batch and train is not None and declared != train_shape:
        # Per sample, the transforms make the inputs: what they make is what the model gets.
        splits.input_shape = train_shape
        log.warning(
            "data: input shape %s after data.train_transforms, not %s as declared; the model is "
            "built for %s",
            train_shape, declared, train_shape,
        )  # fmt: skip
    elif per_batch and train_shape != declared:
        raise ConfigError(
            f"data.train_transforms change the input shape from {tuple(splits.input_shape)} to "
            f"{train_shape}; on in-memory data they run on whole batches on the device and must "
            "keep the shape (crop with padding, flips, colour). Set data.loader=dataloader to "
            "apply them per sample instead."
        )
    if train_shape != val_shape:
        raise ConfigError(
            f"training inputs have shape {train_shape} but validation inputs {val_shape} (sample "
            "0 of each, after data.train_transforms / data.val_transforms): the model sees both, "
            "so the transforms must make inputs of one shape (e.g. resize both the same way)."
        )
    if per_batch:
        splits.train_transform = _chain(splits.train_transform, train)
        splits.val_transform = _chain(splits.val_transform, val)
    else:
        splits.train = PerSample(splits.train, train) if train else splits.train
        splits.val = PerSample(splits.val, val) if val else splits.val
    return splits


def _checked_shape(
    dataset: Dataset, pipeline: Pipeline | None, name: str, per_batch: bool
) -> tuple[int, ...]:
    x, _ = sample_pair(dataset, f"the {name} set")
    if pipeline is not None:
        # A fork of the RNG: checking must not shift the random streams training will draw.
        with torch.random.fork_rng(devices=[]):
            if per_batch:
                x = pipeline.checked(torch.as_tensor(x)[None], f"a batch of {name} sample 0")[0]
            else:
                x = pipeline.checked(x, f"{name} sample 0")
    if not isinstance(x, torch.Tensor):
        after = f" after {pipeline.key}" if pipeline else ""
        raise ConfigError(
            f"the input of {name} sample 0 is a {type(x).__module__}.{type(x).__name__}{after}; "
            "the model needs a tensor: return one from the dataset, or end the transforms with "
            "one that makes it (torchvision.transforms.ToTensor, or v2.ToImage + v2.ToDtype)."
        )
    return tuple(x.shape)


def _chain(first: Callable[[Any], Any] | None, then: Pipeline | None) -> Any:
    if first is None or then is None:
        return then if first is None else first
    return Pipeline([first, *then.steps], then.key)

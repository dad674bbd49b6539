"""Arrays you already have: a `.npz` (numpy) or `.pt` (dict of torch tensors) file.

Inputs are used as stored (cast to float32), so normalise them before saving. The file is split
into train/val with a seeded permutation, like the scikit-learn datasets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from distrain.data.base import Splits, tensor_splits

SUFFIXES = (".npz", ".pt")


def _read_arrays(path: str) -> dict[str, torch.Tensor]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        try:
            # allow_pickle=False: an .npz must not be able to run code when loaded.
            with np.load(path, allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name]) for name in archive.files}
        except ValueError as err:
            raise ValueError(
                f"data.path={path!r} holds an object (pickled) array, which is not loaded for "
                "safety; save plain numeric arrays with numpy.savez."
            ) from err
    if suffix == ".pt":
        # weights_only=True: only tensors and plain containers, never arbitrary pickled code.
        content = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(content, Mapping):
            raise ValueError(
                f"data.path={path!r} holds a {type(content).__name__}; expected a dict of "
                "tensors saved with torch.save({'x': ..., 'y': ...}, path)."
            )
        return {str(name): torch.as_tensor(value) for name, value in content.items()}
    raise ValueError(
        f"data.path={path!r} has suffix {suffix or '(none)'!r}; supported are {', '.join(SUFFIXES)}"
    )


def _class_labels(y: torch.Tensor, path: str, y_key: str) -> torch.Tensor:
    if y.dim() != 1:
        raise ValueError(
            f"classification labels {y_key!r} in {path!r} must be 1-D (one class index per "
            f"sample), got shape {tuple(y.shape)}; use task=regression for vector targets."
        )
    if y.is_floating_point():
        # Labels saved through a float array (e.g. read from CSV) are fine if they are whole.
        fractional = y != y.round()
        if fractional.any():
            bad = y[fractional][0].item()
            raise ValueError(
                f"classification labels {y_key!r} in {path!r} must be whole numbers, found {bad}"
            )
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels {y_key!r} in {path!r} have unsupported dtype {y.dtype}")
    y = y.long()
    if y.min() < 0:
        raise ValueError(
            f"classification labels {y_key!r} in {path!r} must be >= 0, found {y.min().item()}"
        )
    return y


def tensors(
    path: str,
    x_key: str = "x",
    y_key: str = "y",
    val_fraction: float = 0.2,
    seed: int = 0,
    task: str = "classification",
) -> Splits:
    """Features `x_key` and targets `y_key` from a `.npz` or `.pt` file.

    Classification: integer labels, `num_outputs` = max label + 1. Regression: float targets,
    `num_outputs` = target width (1-D targets become shape (N, 1)).
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"data.task must be 'classification' or 'regression', got {task!r}")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.path={path!r} does not exist; expected a {' or '.join(SUFFIXES)} file with "
            f"arrays {x_key!r} (inputs) and {y_key!r} (targets)."
        )
    arrays = _read_arrays(path)
    missing = [key for key in (x_key, y_key) if key not in arrays]
    if missing:
        raise ValueError(
            f"{path!r} has no array named {', '.join(map(repr, missing))}; it has "
            f"{sorted(arrays) or 'none'}. Set data.x_key / data.y_key to the right names."
        )
    x, y = arrays[x_key], arrays[y_key]
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"{x_key!r} and {y_key!r} in {path!r} need a leading sample dimension")
    if len(x) != len(y):
        raise ValueError(
            f"{path!r}: {x_key!r} has {len(x)} samples but {y_key!r} has {len(y)}; "
            "they must have the same length."
        )
    if len(x) < 2:
        raise ValueError(f"{path!r} has {len(x)} sample(s); a train/val split needs at least 2")
    if x.is_complex():
        raise ValueError(f"inputs {x_key!r} in {path!r} have unsupported dtype {x.dtype}")
    x = x.float()
    if x.dim() == 1:  # one scalar feature per sample
        x = x.unsqueeze(1)

    if task == "classification":
        y = _class_labels(y, path, y_key)
        num_outputs = int(y.max().item()) + 1
    else:
        if y.dim() > 2:
            raise ValueError(
                f"regression targets {y_key!r} in {path!r} must be (N,) or (N, D), got "
                f"shape {tuple(y.shape)}"
            )
        y = y.float()
        if y.dim() == 1:
            y = y.unsqueeze(1)  # (N, 1), matching a model with num_outputs=1
        num_outputs = y.shape[1]
    return tensor_splits(
        x, y, val_fraction=val_fraction, seed=seed, num_outputs=num_outputs, task=task
    )

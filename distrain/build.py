"""Build the user-swappable parts from their `_target_` configs.

The driver calls these once on CPU before any actor starts (so a model whose output does not fit
the data, or an optimizer that rejects its lr, fails in the terminal, not in N actors), and each
worker calls them again on its own device.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from torch import nn

from distrain.data.base import LOADER_KEYS, Splits


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_splits(data: dict[str, Any]) -> Splits:
    builder_config = {k: v for k, v in data.items() if k not in LOADER_KEYS}
    splits = instantiate(builder_config, _convert_="all")
    if not isinstance(splits, Splits):
        raise TypeError(
            f"data._target_={data['_target_']} returned {type(splits).__name__}, "
            "not distrain.data.base.Splits"
        )
    return splits


def build_model(model: dict[str, Any], splits: Splits) -> nn.Module:
    """Input and output sizes come from the data, passed to models that take them."""
    target = get_object(model["_target_"])
    sizes = {"input_shape": tuple(splits.input_shape), "num_outputs": splits.num_outputs}
    kwargs = {k: v for k, v in sizes.items() if _accepts(target, k) and k not in model}
    return instantiate(model, **kwargs, _convert_="all")


def build_optimizer(optimizer: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    make = instantiate(optimizer, _convert_="all")  # `_partial_: true`: params come last
    return make(model.parameters())


def build_scheduler(
    scheduler: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> Any:
    """A scheduler stepped once per optimizer step; given the step counts it asks for."""
    if not scheduler or not scheduler.get("_target_"):
        return None
    make = instantiate(scheduler, _convert_="all")
    counts = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    return make(optimizer, **{k: v for k, v in counts.items() if _accepts(make, k)})


def build_loss(loss: dict[str, Any]) -> nn.Module:
    return instantiate(loss, _convert_="all")


def check_model_fits_data(model: nn.Module, splits: Splits, loss_fn: nn.Module) -> None:
    """Forward two real samples on CPU: the output must be (2, num_outputs) and the loss finite."""
    x = torch.stack([splits.train[i][0] for i in range(2)])
    y = torch.stack([torch.as_tensor(splits.train[i][1]) for i in range(2)])
    with torch.no_grad():
        out = model(x)
    expected = (2, splits.num_outputs)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"the model's output has shape {tuple(out.shape)} for a batch of 2, but the data has "
            f"{splits.num_outputs} {'classes' if splits.task == 'classification' else 'targets'}: "
            f"expected {expected}. Let the model take num_outputs from the data "
            "(do not set it in the model config)."
        )
    loss_fn(out, y)

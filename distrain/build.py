"""Build the user-swappable parts from their `_target_` configs.

The driver calls these once on CPU before any actor starts (so a model whose output does not fit
the data, or an optimizer that rejects its lr, fails in the terminal, not in N actors), and each
worker calls them again on its own device.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from torch import nn

from distrain.config import ConfigError, DataConfig, Loader
from distrain.data import transforms
from distrain.data.base import Splits
from distrain.lm import PerTokenLoss

log = logging.getLogger("distrain")
# Keys of `conf/optimizer/*.yaml` that distrain reads; the torch optimizer never sees them.
DISTRAIN_OPTIMIZER_KEYS = ("lr_scaling", "reference_batch", "decay_norms_and_biases")
DEFAULT_REFERENCE_BATCH = 256


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_splits(data: DataConfig) -> Splits:
    """The builder's splits with `data.train_transforms` / `data.val_transforms` attached: per
    batch on the device when batched in memory, per sample in the DataLoader otherwise."""
    source = data.source
    train = transforms.build_pipeline(source.get("train_transforms"), "data.train_transforms")
    val = transforms.build_pipeline(source.get("val_transforms"), "data.val_transforms")
    builder_config = {k: v for k, v in source.items() if k not in transforms.KEYS}
    try:
        splits = instantiate(builder_config, _convert_="all")
    except Exception as error:  # Hydra wraps what the builder raised: a ConfigError is the news
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise
    if not isinstance(splits, Splits):
        raise TypeError(
            f"data._target_={source['_target_']} returned {type(splits).__name__}, "
            "not distrain.data.base.Splits"
        )
    per_batch = splits.in_memory and data.batching.loader != Loader.dataloader
    return transforms.attach(splits, train, val, per_batch=per_batch)


def build_model(model: dict[str, Any], splits: Splits) -> nn.Module:
    """Input and output sizes come from the data, passed to models that take them."""
    sizes = model_sizes(model, splits.task, splits.input_shape, splits.num_outputs)
    if "vocab_size" not in sizes and "vocab_size" not in model:
        _check_needs_no_vocabulary(model["_target_"], splits.task)
    return instantiate(model, **sizes, _convert_="all")


def _check_needs_no_vocabulary(target: str, task: str) -> None:
    """A language model on data that is not token windows would fail in its constructor with
    Python's "missing 1 required positional argument: 'vocab_size'": say what to change."""
    try:
        parameter = inspect.signature(get_object(target)).parameters.get("vocab_size")
    except (TypeError, ValueError):
        return
    if parameter is not None and parameter.default is parameter.empty:
        raise ConfigError(
            f"model._target_={target} is a language model: it takes vocab_size from token data, "
            f"and this data is a {task} set, which has none. Train it on token windows "
            "(data=text or data=tokens; experiment=gpt_stdlib is a whole job)."
        )


def model_sizes(
    model: dict[str, Any], task: str, input_shape: Iterable[int], num_outputs: int
) -> dict[str, Any]:
    """What the model config gets from the data: the sizes its class takes and the config does
    not set (`distrain export` records the same ones beside the weights)."""
    target = get_object(model["_target_"])
    sizes: dict[str, Any] = {"input_shape": tuple(input_shape), "num_outputs": num_outputs}
    if task == "language_model":  # a language model's classes are its token ids
        sizes["vocab_size"] = num_outputs
    return {k: v for k, v in sizes.items() if _accepts(target, k) and k not in model}


def scaled_lr(optimizer: dict[str, Any], global_batch: int) -> float | None:
    """The lr the optimizer gets: `optimizer.lr`, times global batch / reference batch when
    `optimizer.lr_scaling=linear` (the linear scaling rule of Goyal et al., 2017)."""
    lr = optimizer.get("lr")
    if optimizer.get("lr_scaling", "none") != "linear" or lr is None:
        return lr
    return lr * global_batch / optimizer.get("reference_batch", DEFAULT_REFERENCE_BATCH)


def build_optimizer(
    optimizer: dict[str, Any], model: nn.Module, *, global_batch: int
) -> torch.optim.Optimizer:
    """`optimizer` is a `_partial_: true` config; `global_batch` is data.batch_size, for scaling."""
    make = optimizer_factory(optimizer, global_batch=global_batch)
    return make(param_groups(optimizer, model.parameters()))


def param_groups(optimizer: dict[str, Any], params: Iterable[nn.Parameter]) -> list[Any]:
    """The parameters as the optimizer receives them: one list, or with
    `optimizer.decay_norms_and_biases=false` two groups, as nanoGPT's `configure_optimizers`
    makes them: tensors of 2 or more dimensions (weights of linear and conv layers, embeddings)
    get `optimizer.weight_decay`, the others (biases, norm gains, scalars) none.

    Each group keeps the model's parameter order, decayed first; an empty group is left out.
    The checkpoint stores the groups' sizes, so a resume that changes this is refused
    (`preflight.check_resume_groups`).
    """
    params = list(params)
    if optimizer.get("decay_norms_and_biases", True):
        return params
    decayed = [p for p in params if p.ndim >= 2]
    exempt = [p for p in params if p.ndim < 2]
    groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def optimizer_factory(optimizer: dict[str, Any], *, global_batch: int) -> Any:
    """The optimizer class with its settings (a `functools.partial`), lr scaled if asked; the
    aggregator calls it with the parameters (or shards it: trainer.shard_optimizer)."""
    torch_kwargs = {k: v for k, v in optimizer.items() if k not in DISTRAIN_OPTIMIZER_KEYS}
    if "lr" in optimizer:
        torch_kwargs["lr"] = scaled_lr(optimizer, global_batch)
        if torch_kwargs["lr"] != optimizer["lr"]:
            log.info(
                "optimizer.lr_scaling=linear: lr %g x global batch %d / reference batch %d = %g",
                optimizer["lr"],
                global_batch,
                optimizer.get("reference_batch", DEFAULT_REFERENCE_BATCH),
                torch_kwargs["lr"],
            )
    return instantiate(torch_kwargs, _convert_="all")  # `_partial_: true`: params come last


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


def build_loss(loss: dict[str, Any], task: str = "classification") -> nn.Module:
    """The configured loss; for a language model, applied to every token (distrain/lm.py)."""
    loss_fn = instantiate(loss, _convert_="all")
    return PerTokenLoss(loss_fn) if task == "language_model" else loss_fn


def check_model_fits_data(model: nn.Module, splits: Splits, loss_fn: nn.Module) -> None:
    """Forward two real samples on CPU: the output must be (2, num_outputs) and fit the loss
    (for a language model (2, T, vocab_size): logits at every position)."""
    x = torch.stack([splits.train[i][0] for i in range(2)])
    y = torch.stack([torch.as_tensor(splits.train[i][1]) for i in range(2)])
    if splits.train_transform is not None:  # in-memory data: the batch transform on the device
        with torch.random.fork_rng(devices=[]):
            x = splits.train_transform(x)
    with torch.no_grad():
        out = model(x)
    if splits.task == "language_model":
        expected = (2, x.shape[1], splits.num_outputs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the model's output is {shape} for a batch of 2 windows of {x.shape[1]} tokens, "
                f"but a language model must return logits (B, T, V) = {expected}: one score per "
                f"vocabulary id ({splits.num_outputs}, from the data) at every position. Let the "
                "model take vocab_size from the data and return logits for every position."
            )
        _check_loss_fits(loss_fn, out, y, splits.task)
        return
    expected = (2, splits.num_outputs)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"the model's output has shape {tuple(out.shape)} for a batch of 2, but the data has "
            f"{splits.num_outputs} {'classes' if splits.task == 'classification' else 'targets'}: "
            f"expected {expected}. Let the model take num_outputs from the data "
            "(do not set it in the model config)."
        )
    _check_loss_fits(loss_fn, out, y, splits.task)


def _check_loss_fits(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor, task: str) -> None:
    inner = loss_fn.loss_fn if isinstance(loss_fn, PerTokenLoss) else loss_fn
    loss_name = type(inner).__name__
    advice = (
        "use loss=cross_entropy (or loss=nll with a log-softmax output) for classification "
        "and language models, and loss=mse for regression"
    )
    # Checked by type first: cross-entropy takes float targets as class probabilities and MSE
    # broadcasts, so on the wrong task either may run without an error and learn nonsense.
    wrong = (
        (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
        if task in ("classification", "language_model")
        else (nn.CrossEntropyLoss, nn.NLLLoss)
    )
    if isinstance(inner, wrong):
        raise ValueError(f"the loss {loss_name} does not fit a {task} dataset: {advice}.")
    try:
        with torch.no_grad():
            loss = loss_fn(out, y)
    except Exception as error:  # shapes or dtypes the loss cannot take: the wrong loss
        # Not chained: the driver reports a chained error's cause, and this message is the news.
        raise ValueError(
            f"the loss {loss_name} cannot compare the model's output {tuple(out.shape)} with the "
            f"{task} targets (shape {tuple(y.shape)}, {y.dtype}): {error}. {advice}."
        ) from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            f"the loss {loss_name} returned {getattr(loss, 'shape', type(loss).__name__)}, not a "
            "scalar: use reduction='mean' (the default)."
        )
    if isinstance(inner, nn.NLLLoss):
        # NLLLoss takes log-probabilities; on raw logits it minimises -logit without bound and
        # training diverges silently. Log-probabilities have logsumexp 0 in every row.
        total = out.float().logsumexp(dim=-1)
        if not torch.allclose(total, torch.zeros_like(total), atol=1e-3):
            raise ValueError(
                "loss=nll (NLLLoss) needs log-probabilities, but the model's outputs are not: "
                "set model.log_softmax=true (mlp, cnn, resnet18, rnn), end your own model with "
                "nn.LogSoftmax(dim=1), or use loss=cross_entropy on raw logits."
            )

"""Benchmark workloads shared by the peer baselines and by distrain's own benchmark run.

Each workload is pure torch + scikit-learn and fully determined by its seed, so every baseline
(and every process of a multi-process baseline) trains the same model on the same data.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
from torch import nn

from benchmarks.workload_specs import SPECS, WORKLOADS


@dataclass(frozen=True)
class Workload:
    name: str
    model_fn: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    lr: float
    batch_per_worker: int  # default per-worker batch size


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 28 -> 26 -> 13
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 13 -> 11 -> 5
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here, not at the top: scikit-learn (scipy with it) costs a process about 1.3 s of
    # CPU, and distrain's workers import this module for the model alone (its driver builds the
    # data once and ships it), so only the processes that load the digits should pay for it.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    # Standardise per feature; constant pixels (std 0) stay 0 instead of dividing by zero.
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / (std + (std == 0))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def _teacher_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Labels come from a fixed random linear teacher, so the task is learnable but not trivial.
    x = torch.randn(n, 784, generator=gen)
    teacher = torch.randn(784, 10, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


def _template_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # A linear teacher over raw pixels barely trains a conv+pool net (loss ~2.30 after 500
    # steps), so each class is a blocky 7x7 pattern upsampled to 28x28 and buried in noise.
    y = torch.randint(0, 10, (n,), generator=gen)
    templates = torch.randn(10, 1, 7, 7, generator=gen).repeat_interleave(4, -1)
    templates = templates.repeat_interleave(4, -2)
    return 0.3 * templates[y] + torch.randn(n, 1, 28, 28, generator=gen), y


def _template_rgb(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # CIFAR-10-sized images (3x32x32) built like `_template_images`: learnable, no download.
    y = torch.randint(0, 10, (n,), generator=gen)
    templates = torch.randn(10, 3, 8, 8, generator=gen).repeat_interleave(4, -1)
    templates = templates.repeat_interleave(4, -2)
    return 0.3 * templates[y] + torch.randn(n, 3, 32, 32, generator=gen), y


def _resnet18() -> nn.Module:
    from distrain.models.resnet import resnet18  # torchvision's, with the 32x32 stem

    return resnet18((3, 32, 32), 10)


# Each workload's model; `model_builder` reseeds before building it.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits_mlp": partial(_mlp, 64, 256, 256, 10),
    "mlp6m": partial(_mlp, 784, 2048, 2048, 10),
    "cnn": _cnn,
    "resnet18": _resnet18,  # GPU-sized: gpu_check.py runs it, make bench does not
}


def _check_name(name: str) -> None:
    if name not in SPECS:
        raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def model_builder(name: str, seed: int = 0) -> Callable[[], nn.Module]:
    """Workload `name`'s model, built from `seed` alone, without its data: a distrain worker
    needs only this (its driver builds the data once and ships it to the workers)."""
    _check_name(name)
    build = MODELS[name]

    def model_fn() -> nn.Module:
        # Reseed so every process and every baseline starts from identical weights.
        torch.manual_seed(seed)
        return build()

    return model_fn


def _data(name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    samples = SPECS[name].train_samples
    if name == "digits_mlp":
        return _digits()
    if name == "mlp6m":
        return _teacher_data(samples, gen)
    if name == "cnn":
        return _template_images(samples, gen)
    return _template_rgb(samples, gen)


def make_workload(name: str, seed: int = 0) -> Workload:
    """Build workload `name`; data and initial weights depend only on `seed`."""
    _check_name(name)
    spec = SPECS[name]
    x, y = _data(name, torch.Generator().manual_seed(seed))
    assert len(x) == spec.train_samples, (name, len(x))
    return Workload(name, model_builder(name, seed), x, y, spec.lr, spec.batch_per_worker)

"""Synthetic data of any size and shape, labelled by a fixed random "teacher" network.

Inputs are standard Gaussian; targets come from a seeded random 2-layer tanh MLP over the
flattened input (argmax of its outputs for classification, the outputs themselves for
regression). The labels are therefore a smooth function of the inputs that a student model can
learn, unlike random labels, which makes this a stand-in for a real dataset of any shape (e.g.
(784,) like MNIST, (3, 32, 32) like CIFAR or (T, F) sequences) when benchmarking throughput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from distrain.data.base import Splits, tensor_splits

# Rows generated per step: bounds the teacher's temporary activations whatever num_samples is.
CHUNK_SAMPLES = 8192
# The teacher gets its own generator stream so it does not depend on num_samples.
_TEACHER_SEED_OFFSET = 1_000_003


def _teacher(
    num_features: int, hidden: int, num_outputs: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + _TEACHER_SEED_OFFSET)
    # 1/sqrt(fan_in) keeps the tanh pre-activations ~N(0, 1): informative, not saturated.
    w1 = torch.randn(num_features, hidden, generator=gen) / math.sqrt(num_features)
    w2 = torch.randn(hidden, num_outputs, generator=gen)
    # Unit-norm output columns with no bias: every class's logit has the same distribution,
    # so argmax labels are roughly balanced.
    w2 = w2 / w2.norm(dim=0, keepdim=True)
    return w1, w2


def synthetic(
    num_samples: int = 4096,
    input_shape: Sequence[int] = (784,),
    num_classes: int = 10,
    task: str = "classification",
    seed: int = 0,
    val_fraction: float = 0.2,
    teacher_hidden: int = 64,
    noise: float = 0.0,
) -> Splits:
    """`num_samples` Gaussian inputs of `input_shape` with teacher targets.

    For regression, `num_classes` is the target width. `noise` is the standard deviation of
    Gaussian noise added to the teacher's outputs: label noise for classification (argmax of
    noisy logits), target noise for regression.
    """
    shape = tuple(int(d) for d in input_shape)  # Hydra passes a ListConfig
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"data.input_shape must be positive sizes, got {list(input_shape)}")
    if task not in ("classification", "regression"):
        raise ValueError(f"data.task must be 'classification' or 'regression', got {task!r}")
    if num_samples < 2:
        raise ValueError(f"data.num_samples must be >= 2 for a train/val split, got {num_samples}")
    min_classes = 2 if task == "classification" else 1
    if num_classes < min_classes:
        raise ValueError(f"data.num_classes must be >= {min_classes} for {task}, got {num_classes}")
    if teacher_hidden < 1:
        raise ValueError(f"data.teacher_hidden must be >= 1, got {teacher_hidden}")
    if noise < 0:
        raise ValueError(f"data.noise must be >= 0 (a standard deviation), got {noise}")

    num_features = math.prod(shape)
    w1, w2 = _teacher(num_features, teacher_hidden, num_classes, seed)
    gen = torch.Generator().manual_seed(seed)
    # Preallocated and filled chunk by chunk: 60k x 784 floats is ~190 MB once, not several times.
    x = torch.empty(num_samples, num_features)
    if task == "classification":
        y = torch.empty(num_samples, dtype=torch.long)
    else:
        y = torch.empty(num_samples, num_classes)
    for start in range(0, num_samples, CHUNK_SAMPLES):
        stop = min(start + CHUNK_SAMPLES, num_samples)
        chunk = torch.randn(stop - start, num_features, generator=gen)
        out = torch.tanh(chunk @ w1) @ w2
        if noise > 0:
            out = out + noise * torch.randn(out.shape, generator=gen)
        x[start:stop] = chunk
        y[start:stop] = out.argmax(dim=1) if task == "classification" else out
    return tensor_splits(
        x.view(num_samples, *shape),
        y,
        val_fraction=val_fraction,
        seed=seed,
        num_outputs=num_classes,
        task=task,
    )

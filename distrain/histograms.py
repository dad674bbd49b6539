"""Weight and gradient histograms, summarised on the worker so only bucket counts travel.

A histogram record is a few hundred numbers per tensor whatever the model's size; the driver
writes them with `SummaryWriter.add_histogram_raw`. Only rank 0 sends them: after aggregation
every rank holds the same weights and the same averaged gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BINS = 30


def histogram(values: torch.Tensor, bins: int = BINS) -> dict[str, Any]:
    """The fields TensorBoard's histogram proto needs, for one tensor."""
    return histograms([values], bins)[0]


def histograms(tensors: list[torch.Tensor], bins: int = BINS) -> list[dict[str, Any]]:
    """`histogram` of each tensor, computed where the tensors live: only the statistics and the
    bucket counts (a few numbers per tensor) reach the host, in two transfers for all of them."""
    if not tensors:
        return []
    # A sharded (FSDP) tensor: this rank's shard. Only rank 0 sends histograms, and gathering
    # would be a collective the other ranks do not join.
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    flats = [t.detach().float().flatten() for t in local]
    stats = torch.stack(
        [torch.stack([f.min(), f.max(), f.sum(), f.square().sum()]) for f in flats]
    ).tolist()  # one device-to-host copy (and sync) for every tensor's statistics
    # A constant tensor gets one bucket holding everything.
    ranges = [(low, high if high > low else low + 1e-12) for low, high, _, _ in stats]
    counts = torch.stack(
        [torch.histc(f, bins=bins, min=low, max=high) for f, (low, high) in zip(flats, ranges)]
    ).tolist()  # the second and last copy
    return [
        {
            "min": low,
            "max": high,
            "num": flat.numel(),
            "sum": total,
            "sum_squares": squares,
            # The right edge of each bucket, as TensorBoard wants.
            "bucket_limits": torch.linspace(low, high, bins + 1)[1:].tolist(),
            "bucket_counts": bucket_counts,
        }
        for flat, (low, high), (_, _, total, squares), bucket_counts in zip(
            flats, ranges, stats, counts
        )
    ]


def model_histograms(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`weights/<name>` and `grads/<name>` for every parameter (grads where there are any)."""
    names, tensors = [], []
    for name, param in model.named_parameters():
        names.append(f"weights/{name}")
        tensors.append(param)
        if param.grad is not None:
            names.append(f"grads/{name}")
            tensors.append(param.grad)
    return dict(zip(names, histograms(tensors)))

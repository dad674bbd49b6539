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
    # A sharded (FSDP) tensor: this rank's shard. Only rank 0 sends histograms, and gathering
    # would be a collective the other ranks do not join.
    local = values.to_local() if hasattr(values, "to_local") else values
    flat = local.detach().float().flatten().cpu()
    low, high = flat.min().item(), flat.max().item()
    if high <= low:  # a constant tensor: one bucket holding everything
        high = low + 1e-12
    counts = torch.histc(flat, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {
        "min": low,
        "max": high,
        "num": flat.numel(),
        "sum": flat.sum().item(),
        "sum_squares": flat.square().sum().item(),
        "bucket_limits": edges[1:].tolist(),  # right edge of each bucket, as TensorBoard wants
        "bucket_counts": counts.tolist(),
    }


def model_histograms(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`weights/<name>` and `grads/<name>` for every parameter (grads where there are any)."""
    out: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        out[f"weights/{name}"] = histogram(param)
        if param.grad is not None:
            out[f"grads/{name}"] = histogram(param.grad)
    return out

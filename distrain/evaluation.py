"""Evaluation on a worker's validation shard: sums the driver adds across workers.

Sums, not means, so that any number of workers (and uneven shards) give the exact mean once the
driver divides the total by the total count.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distrain.data.batches import Batch
from distrain.records import ValidationSums
from distrain.step import Parts


@torch.no_grad()
def evaluate(parts: Parts, batches: Iterable[Batch]) -> ValidationSums:
    """Sums over this worker's validation shard; the driver adds the workers' sums together."""
    parts.model.eval()
    device = parts.batches.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_top5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    per_token = parts.task == "language_model"  # the loss is a mean over every token
    # Under FSDP the forward is a collective: the aggregator pads ranks with empty batches.
    for x, y in parts.aggregator.eval_batches(batches):
        with parts.autocast():
            out = parts.model(x)
        if not len(x):  # a padding batch: forward only, nothing to count
            continue
        with parts.autocast():
            loss = parts.loss_fn(out, y)
        n = y.numel() if per_token else len(x)
        loss_sum += loss.double() * n
        if parts.task == "classification":
            correct += (out.argmax(dim=1) == y).sum()
            if out.shape[1] > 5:  # top-5 only means something with more than 5 classes
                correct_top5 += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
        count += n
    parts.model.train()
    top5 = parts.task == "classification" and parts.num_outputs > 5
    return ValidationSums(
        loss_sum=loss_sum.item(),
        correct=int(correct),
        count=count,
        correct_top5=int(correct_top5) if top5 else None,
        bytes=count * parts.bytes_per_token if per_token and parts.bytes_per_token else None,
    )

"""A rank's training state, captured and restored in one place: what a checkpoint holds.

The state is the model and optimizer tensors (as row pieces, distrain/shards.py), the schedule
and gradient scaler and the data position (`loop.Position`); no random state (each stream is
seeded from (configured rank, step) right before it draws: distrain/streams.py). A rank
captures its share of a checkpoint without a collective; a healed group's ranks restore from one
survivor's whole state captured as a world of one (distrain/healing.py). The same `restore`
reads both, on any worker count.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from distrain import shards
from distrain.loop import Position
from distrain.step import Parts

Header = dict[str, Any]


def capture(
    parts: Parts, position: Position, *, rank: int, world_size: int
) -> tuple[Header, dict[str, torch.Tensor]]:
    """Rank `rank`'s share of a checkpoint of `world_size` shares: a plain header, and the
    tensors it holds (views: copy them before the next step). `rank=0, world_size=1`: every row,
    the whole state of a replica."""
    share, settings, values = shards.capture(
        parts.model,
        parts.optimizer,
        rank=rank,
        world_size=world_size,
        identical_replicas=parts.aggregator.identical_replicas,
    )
    header: Header = {
        "position": position.plain(),
        "index": share.index,
        "optimizer_values": values,
    }
    if rank == 0:
        header["lead"] = {
            "optimizer": settings,
            "scheduler": shards.plain(parts.scheduler.state_dict()) if parts.scheduler else None,
            "scaler": shards.plain(parts.scaler.state_dict())
            if parts.scaler.is_enabled()
            else None,
        }
    return header, share.tensors


def restore(parts: Parts, source: dict[str, Any], *, rank: int) -> Position:
    """Load `source` into `parts`; the position to train on from. `source` is a checkpoint's
    metadata and one object-store reference per shard (this rank fetches only the shards holding
    rows it needs); a healed group's state comes as the survivor sent it ("wire": arrays of
    `shards.to_wire`), a checkpoint's as tensors."""
    meta = source["meta"]
    reader = shards.ShardReader(
        meta["tensors"],
        # Wire arrays are views of this node's object store, shared by its workers: the optimizer
        # would keep them as its state (same dtype and device: no copy) and every rank of the
        # node would step the same buffers. Each rank takes its own copy.
        (lambda i: _owned(shards.from_wire(ray.get(source["shards"][i]))))
        if source.get("wire")
        else (lambda i: ray.get(source["shards"][i])),
    )
    model_state, optimizer_state = shards.restore_state(
        reader, parts.model, parts.optimizer, meta["optimizer"]
    )
    parts.aggregator.load_state(parts.model, parts.optimizer, model_state, optimizer_state)
    if parts.scheduler is not None and meta.get("scheduler") is not None:
        parts.scheduler.load_state_dict(meta["scheduler"])
    if meta.get("scaler") is not None:
        parts.scaler.load_state_dict(meta["scaler"])
    # The epoch's loss so far is carried by rank 0 alone, so the workers' sums still add up.
    position = meta["position"]
    if rank != 0:
        position = {**position, "epoch_loss_sum": 0.0, "epoch_batches": 0}
    return Position(**position)


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in tensors.items()}

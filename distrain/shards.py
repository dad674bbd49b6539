"""What one rank contributes to a sharded checkpoint, and how a rank reads its part back.

Every tensor of the training state (model, optimizer, RNG) is stored as row pieces: each piece
is a contiguous range of the tensor's first dimension, held by one shard file. A rank writes
only what it holds, and nothing is gathered:

* a sharded tensor (FSDP's DTensor, `Shard(0)`) contributes its local rows;
* a tensor only this rank holds (ZeRO-1's optimizer state of the parameters it owns) goes whole;
* a replicated tensor (DDP) is split by rows the way FSDP would split it (`torch.chunk`: rank r
  writes chunk r), so W ranks write 1/W each, in parallel; a 0-dim tensor is rank 0's.

Reading back, a rank asks for the rows it needs (its FSDP shard, or the whole tensor for DDP and
ZeRO) and gets them from whichever pieces overlap them, so a checkpoint loads on any worker count
and any strategy. torch's distributed checkpoint does the same, but its reader unpickles its
metadata; here the index is JSON (`meta["tensors"]`) and the pieces are safetensors: plain data.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

Tensors = dict[str, torch.Tensor]
# A tensor's key in the checkpoint: "model/<name>", "optimizer/<index>/<name>", "rng/<rank>/<kind>".
# The index is the parameter's position in the optimizer's groups (Optimizer.state_dict()'s key).


def _is_dtensor(value: Any) -> bool:
    """A sharded tensor (FSDP's). Importing torch.distributed.tensor costs every process half a
    second (its op registrations); only FSDP makes DTensors, and it imports the module itself, so
    a process without it holds none."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def chunk_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk `rank` of `world_size` (torch.chunk's rule, FSDP2's split)."""
    size = math.ceil(rows / world_size)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def _piece(
    value: torch.Tensor, *, rank: int, world_size: int, split: bool
) -> tuple[torch.Tensor, list[int] | None] | None:
    """(this rank's rows of `value`, [start, stop]) or None when another rank writes them."""
    if _is_dtensor(value):
        from torch.distributed.tensor import Shard

        if list(value.placements) != [Shard(0)]:
            raise ValueError(f"only Shard(0) DTensors are checkpointed, not {value.placements}")
        local = value.to_local()
        mesh_rank = value.device_mesh.get_local_rank()
        start, stop = chunk_rows(value.shape[0], mesh_rank, value.device_mesh.size())
        if local.shape[0] != stop - start:
            raise ValueError(f"local shard of {stop - start} rows expected, got {local.shape[0]}")
        return local, [start, stop]
    if value.dim() == 0:
        return (value, None) if rank == 0 or not split else None
    if not split:
        return value, [0, value.shape[0]]
    start, stop = chunk_rows(value.shape[0], rank, world_size)
    return value[start:stop], [start, stop]


class ShareBuilder:
    """One rank's tensors (views of its state, on its device) and their index entries."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.tensors: Tensors = {}
        self.index: dict[str, dict[str, Any]] = {}

    def add(self, key: str, value: torch.Tensor, *, split: bool = True) -> None:
        """`split`: the tensor is the same on every rank, so each writes its chunk of it."""
        taken = _piece(value, rank=self.rank, world_size=self.world_size, split=split)
        if taken is None:
            return
        piece, rows = taken
        if rows is not None and rows[0] == rows[1]:
            return  # fewer rows than ranks: nothing here
        # A view where it can be (no copy here): `to_wire` + `ray.put` copy only these rows,
        # before the step goes on changing the parameters in place.
        self.tensors[key] = piece.detach().contiguous()
        self.index[key] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "rows": rows,
        }


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int,
    world_size: int,
    identical_replicas: bool,
) -> tuple[ShareBuilder, dict[str, Any], dict[str, Any]]:
    """This rank's share of the model and optimizer state; the optimizer's settings (its param
    groups) and the non-tensor state values this rank holds (by parameter index).

    `identical_replicas`: every rank holds the same replicated tensors (false for the
    asynchronous parameter server, whose workers may hold different versions: rank 0 writes
    them whole).
    """
    share = ShareBuilder(rank, world_size)

    def add(key: str, value: torch.Tensor) -> None:
        if identical_replicas or _is_dtensor(value):
            share.add(key, value, split=True)
        elif rank == 0:
            share.add(key, value, split=False)

    for name, value in model.state_dict().items():
        add(f"model/{name}", value)
    # ZeRO-1 keeps the state of the parameters this rank owns in an inner optimizer.
    inner = getattr(optimizer, "optim", None)
    owned = inner.state if inner is not None else None
    values: dict[str, dict[str, Any]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        state = owned.get(param) if owned is not None else optimizer.state.get(param)
        for name, value in (state or {}).items():
            key = f"optimizer/{index}/{name}"
            if not isinstance(value, torch.Tensor):
                if rank == 0 or owned is not None:
                    values.setdefault(str(index), {})[name] = value
            elif owned is not None:  # only its owner has it: whole
                share.add(key, value, split=False)
            else:
                add(key, value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    settings = {"param_groups": plain(groups), "group_sizes": sizes}
    return share, settings, plain(values)


Wire = dict[str, tuple[np.ndarray, str]]


def to_wire(tensors: Tensors) -> Wire:
    """Host numpy arrays for `ray.put`: Ray copies a numpy array's bytes straight into its object
    store (out-of-band, the rows of a view only), about half the time it takes to pickle a torch
    tensor, so the step waits less. numpy has no bfloat16: such rows travel as int16."""
    wire = {}
    for key, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        wire[key] = (tensor.cpu().numpy(), dtype)
    return wire


def from_wire(wire: Wire) -> Tensors:
    """The inverse of `to_wire` (the arrays Ray returns are read-only views of its store)."""
    tensors = {}
    for key, (array, dtype) in wire.items():
        with warnings.catch_warnings():  # read-only: safetensors only reads them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        tensors[key] = tensor.view(getattr(torch, dtype))
    return tensors


def plain(value: Any) -> Any:
    """`value` as JSON data (a checkpoint's metadata is JSON, never a pickle): 0-dim tensors
    become numbers, tuples lists; anything else that JSON cannot hold is an error here, at
    capture, rather than a failed write later."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"a checkpoint's metadata holds only plain values, not {type(value).__name__}")


class ShardReader:
    """Rows of the checkpoint's tensors, from the pieces that hold them.

    `index` is `meta["tensors"]`: key -> shape, dtype and pieces (`{"shard": i, "rows": [a, b]}`,
    rows None for a 0-dim tensor); `fetch(i)` returns shard i's tensors (read on first use).
    """

    def __init__(self, index: dict[str, dict[str, Any]], fetch: Callable[[int], Tensors]) -> None:
        self.index = index
        self._fetch = fetch
        self._shards: dict[int, Tensors] = {}

    def keys(self, prefix: str) -> Iterator[str]:
        return (key for key in self.index if key.startswith(prefix))

    def _shard(self, number: int) -> Tensors:
        if number not in self._shards:
            self._shards[number] = self._fetch(number)
        return self._shards[number]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        entry = self.index[key]
        shape, pieces = entry["shape"], entry["pieces"]
        if not shape:
            return self._shard(pieces[0]["shard"])[key]
        parts = []
        for piece in sorted(pieces, key=lambda p: p["rows"][0]):
            first, last = piece["rows"]
            low, high = max(first, start), min(last, stop)
            if low < high:
                parts.append(self._shard(piece["shard"])[key][low - first : high - first])
        if not parts:
            return torch.empty((0, *shape[1:]), dtype=getattr(torch, entry["dtype"]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def full(self, key: str) -> torch.Tensor:
        shape = self.index[key]["shape"]
        return self.rows(key, 0, shape[0] if shape else 0)

    def like(self, key: str, current: torch.Tensor) -> torch.Tensor:
        """The saved tensor laid out as `current` is: this rank's rows of a DTensor of the same
        shape (FSDP), else the whole tensor."""
        shape = self.index[key]["shape"]
        if not _is_dtensor(current) or list(current.shape) != shape or not shape:
            return self.full(key)
        from torch.distributed.tensor import DTensor

        mesh = current.device_mesh
        start, stop = chunk_rows(shape[0], mesh.get_local_rank(), mesh.size())
        local = self.rows(key, start, stop).to(current.to_local().device)
        return DTensor.from_local(
            local,
            mesh,
            current.placements,
            run_check=False,
            shape=current.shape,
            stride=current.stride(),
        )


def restore_state(
    reader: ShardReader,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optimizer_meta: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state dicts for this rank, laid out as its model and optimizer are
    (`Optimizer.state_dict()` format, DTensors where the parameters are)."""
    model_state = {
        name: reader.like(f"model/{name}", current) for name, current in model.state_dict().items()
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(params):
        prefix = f"optimizer/{index}/"
        entry: dict[str, Any] = {
            key.removeprefix(prefix): reader.like(key, param) for key in reader.keys(prefix)
        }
        entry |= optimizer_meta["values"].get(str(index), {})
        if entry:
            state[index] = entry
    groups, first = [], 0
    for group, size in zip(optimizer_meta["param_groups"], optimizer_meta["group_sizes"]):
        groups.append({**group, "params": list(range(first, first + size))})
        first += size
    return model_state, {"state": state, "param_groups": groups}

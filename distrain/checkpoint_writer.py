"""Driver side of a checkpoint: every rank's share assembled into one, written in the background.

Each rank sends a checkpoint record: a small plain header inline (its data position, the index
of the tensor pieces it holds, and on rank 0 the schedule and optimizer settings) and a
reference to its tensors in Ray's object store. Once all ranks have sent theirs, the header
becomes the checkpoint's `meta.json` and a background thread fetches the shares and writes them,
one shard file per rank in parallel (distrain/checkpoint.py). One write runs at a time: the
next checkpoint waits in a queue for the previous one, and the driver's loop blocks only when
`MAX_QUEUED` are waiting, so a slow disk neither stalls the loop nor fills memory.

With `trainer.async_checkpoint=false` the workers wait until the write is done (the driver tells
them through the sink); with `true` they go on as soon as their share is in the object store.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from distrain import hangs
from distrain.checkpoint import CheckpointStore, Saved
from distrain.errors import GroupFailed, TrainingFailed
from distrain.records import CheckpointRecord
from distrain.shards import from_wire
from distrain.watch import first_line

MAX_QUEUED = 2  # checkpoints waiting for the writer (the one being written included)


@dataclass
class Pending:
    """A checkpoint whose every share has arrived: its metadata and the shares' references."""

    meta: dict[str, Any]
    shares: list[Any]  # ObjectRef per rank

    @property
    def step(self) -> int:
        return self.meta["step"]


class ShareTimeout(RuntimeError):
    """A share could not be fetched within the timeout (its node unreachable from the driver)."""


class ShareLost(RuntimeError):
    """A share's owner (rank `rank`'s worker) died before the driver read it."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass
class WriteResult:
    step: int
    saved: Saved | None = None
    error: BaseException | None = None
    write_s: float = 0.0


@dataclass
class CheckpointWriter:
    store: CheckpointStore
    job: dict[str, Any]  # the groups a resume must match (preflight.RESUME_MUST_MATCH)
    fetch_timeout_s: float
    _arrived: dict[int, dict[int, CheckpointRecord]] = field(default_factory=dict)
    # Checkpoints to write, oldest first; the first is being written while the thread runs.
    _queue: deque[tuple[dict[str, Any], list[Any], WriteResult]] = field(default_factory=deque)
    _results: list[WriteResult] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    write_s: list[float] = field(default_factory=list)
    size_bytes: int = 0

    def add(self, record: CheckpointRecord, world_size: int) -> Pending | None:
        """One rank's checkpoint record; the assembled checkpoint once all ranks sent theirs."""
        ranks = self._arrived.setdefault(record.step, {})
        ranks[record.rank] = record
        if len(ranks) < world_size:
            return None
        del self._arrived[record.step]
        records = [ranks[rank] for rank in range(world_size)]
        return Pending(self.assemble(records, record.epoch_end), [r.share[0] for r in records])

    def assemble(self, records: list[CheckpointRecord], epoch_end: bool) -> dict[str, Any]:
        """A checkpoint's metadata from its ranks' records, in rank order."""
        headers = [r.header for r in records]
        position = dict(headers[0]["position"])
        position["epoch_loss_sum"] = sum(h["position"]["epoch_loss_sum"] for h in headers)
        position["epoch_batches"] = sum(h["position"]["epoch_batches"] for h in headers)
        tensors: dict[str, dict[str, Any]] = {}
        for rank, header in enumerate(headers):
            for key, entry in header["index"].items():
                merged = tensors.setdefault(
                    key, {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": []}
                )
                merged["pieces"].append({"shard": rank, "rows": entry["rows"]})
        optimizer = dict(headers[0]["lead"]["optimizer"])
        optimizer["values"] = {k: v for h in headers for k, v in h["optimizer_values"].items()}
        return {
            "step": position["step"],
            "epoch": position["epoch"],
            "step_in_epoch": position["step_in_epoch"],
            "position": position,
            "world_size": len(headers),
            "epoch_end": epoch_end,
            "job": self.job,
            "scheduler": headers[0]["lead"]["scheduler"],
            "scaler": headers[0]["lead"]["scaler"],
            "optimizer": optimizer,
            "tensors": tensors,
        }

    def submit(
        self, pending: Pending, history: list[dict[str, Any]], val_losses: list[Any]
    ) -> None:
        """Queue `pending` for the background writer, which writes one checkpoint at a time, in
        order. The caller (the driver's loop) blocks only when MAX_QUEUED are already waiting:
        the shares held in the object store stay bounded however slow the disk is. `history`:
        the epochs' figures; `val_losses`: [step, loss] of the evaluations up to its step."""
        meta = {**pending.meta, "history": history, "val_losses": val_losses}
        with self._changed:
            while len(self._queue) >= MAX_QUEUED:
                self._changed.wait()
            self._queue.append((meta, pending.shares, WriteResult(pending.step)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, daemon=True)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._changed:
                if not self._queue:
                    self._thread = None
                    self._changed.notify_all()
                    return
                meta, shares, result = self._queue[0]
            self._write(meta, shares, result)
            with self._changed:
                self._queue.popleft()
                self._results.append(result)
                self._changed.notify_all()

    def _write(self, meta: dict[str, Any], shares: list[Any], result: WriteResult) -> None:
        started = time.perf_counter()

        def fetch(ref: Any, rank: int) -> Any:
            try:
                return from_wire(ray.get(ref, timeout=self.fetch_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise ShareTimeout(f"not fetched within {self.fetch_timeout_s:g} s") from None
            except ray.exceptions.RayError as error:
                raise ShareLost(rank, str(error).strip().splitlines()[0]) from None

        try:
            readers = [lambda r=r, ref=ref: fetch(ref, r) for r, ref in enumerate(shares)]
            result.saved = self.store.save(meta, readers)
        except BaseException as error:  # reported to the driver's loop by `finished`
            result.error = error
        result.write_s = time.perf_counter() - started

    def finished(self) -> list[WriteResult]:
        """The writes done since the last call, oldest first (each returned once)."""
        with self._changed:
            results, self._results = self._results, []
        for result in results:
            if result.saved is not None:
                self.write_s.append(result.write_s)
                self.size_bytes = result.saved.size_bytes
        return results

    def wait(self) -> list[WriteResult]:
        """Block until every queued checkpoint is written (or failed); their results."""
        with self._changed:
            while self._thread is not None:
                self._changed.wait()
        return self.finished()

    def forget(self) -> None:
        """After a failure: drop shares of checkpoints no longer completable."""
        self._arrived.clear()

    def stats(self) -> dict[str, Any]:
        """For metrics.json: how many were written, how long each took, the last one's size."""
        return {"saved": len(self.write_s), "write_s": self.write_s, "size_bytes": self.size_bytes}


def write_failure(
    result: WriteResult, nodes: list[dict[str, Any]], step_timeout_s: float
) -> GroupFailed | TrainingFailed:
    """What a failed write means for the run. A share not fetched in time, or lost with its
    rank, fails the group as a hang would (a restart, naming unreachable nodes); the disk
    (full, read-only) fails the run: a restart would not fix it."""
    error, step = result.error, result.step
    if isinstance(error, ShareTimeout):
        noticed_s = time.monotonic()  # the probe below waits up to 5 s more on a cut-off node
        return GroupFailed(
            f"checkpoint of step {step}: the workers' shares did not arrive within "
            f"trainer.step_timeout_s={step_timeout_s:g} s (a node unreachable from the driver?)",
            unreachable_nodes=hangs.unreachable({n["node_id"] for n in nodes}),
            noticed_s=noticed_s,
        )
    if isinstance(error, ShareLost):
        node = next((n for n in nodes if n["rank"] == error.rank), {})
        return GroupFailed(
            f"rank {error.rank} (node {node.get('node_ip', '?')}, pid {node.get('pid', '?')}) "
            f"was lost before the driver read its share of the checkpoint of step {step}; "
            f"the previous checkpoint is kept ({first_line(error)})"
        )
    return TrainingFailed(f"checkpoint of step {step} could not be written: {error}")

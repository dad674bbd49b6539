"""The server actors of `aggregator=parameter_server`: each owns one contiguous shard.

Transport. A shard travels as numpy arrays, never as per-tensor pickles. Ray passes an argument
or reply under 100 KiB inside the call itself and anything larger through the shared-memory object
store, and on a busy node the store's extra hops cost more than the bytes: so a shard up to
`INLINE_MAX_BYTES` is sent as `num_chunks()` arrays of at most `CHUNK_BYTES` (inline both ways,
the reply with `num_returns`), and a larger one as a single array through the object store, which
the server reads in place (zero copy).

Both servers are threaded actors: each worker's call gets a thread, and one lock orders the
updates of the shard, so a barrier (`AveragingServer`, `finish`) can wait without blocking the
other workers' calls.

* `AveragingServer` (`mode=sync`): waits for all W gradients of a step, returns their mean; each
  worker's own optimizer then steps, exactly as with all-reduce.
* `UpdatingServer` (`mode=async`): owns the shard's parameters and optimizer, applies each
  gradient as it arrives and returns the current parameters. A gradient computed on parameters
  more than `max_staleness` versions old is dropped (counted), never applied.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from distrain.aggregators.base import optimizer_state_bytes

CHUNK_BYTES = 90_000  # under Ray's 100 KiB limit for inline arguments, with room for headers
INLINE_MAX_BYTES = 1 << 20  # larger shards go through the object store as one array


def num_chunks(nbytes: int) -> int:
    """How many arrays a shard of `nbytes` travels as (1: one object-store array)."""
    return 1 if nbytes > INLINE_MAX_BYTES else max(1, -(-nbytes // CHUNK_BYTES))


def write_chunks(out: np.ndarray, chunks: tuple[np.ndarray, ...], add: bool) -> None:
    """`out` = (or +=) the concatenation of `chunks`, without building the concatenation."""
    start = 0
    for chunk in chunks:
        view = out[start : start + len(chunk)]
        if add:
            np.add(view, chunk, out=view)
        else:
            np.copyto(view, chunk)
        start += len(chunk)


def _reply(shard: np.ndarray, chunks: int) -> np.ndarray | list[np.ndarray]:
    return shard if chunks == 1 else np.array_split(shard, chunks)


class _Server:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._lock = threading.Condition()
        self._finished: set[int] = set()

    def finish(self, rank: int) -> dict[str, Any]:
        """A last barrier: every worker calls it at the end and gets the final counters.

        Barriers here never time out: a worker waits for them with its own timeout
        (`trainer.step_timeout_s`), and the driver kills the servers when a worker fails.
        """
        with self._lock:
            self._finished.add(rank)
            self._lock.notify_all()
            self._lock.wait_for(lambda: len(self._finished) == self.world_size)
            return self.stats()

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError


class AveragingServer(_Server):
    """Synchronous: the mean over all W workers of each step's gradient shard."""

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size)
        # Two sums, by step parity: step v+2 cannot start before every worker has received the
        # mean of step v, so a buffer is never overwritten while a reply is still being sent.
        self._sums: list[np.ndarray] = []
        self._arrived = [0, 0]
        self._completed = [-1, -1]  # the last step whose mean is ready, per slot
        self.steps = 0
        self.wait_s = 0.0  # time workers spent waiting here for slower workers, summed

    def push_pull(self, rank: int, step: int, *grad: np.ndarray) -> np.ndarray | list[np.ndarray]:
        slot = step % 2
        with self._lock:
            if not self._sums:
                size = sum(len(chunk) for chunk in grad)
                self._sums = [np.empty(size, np.float32), np.empty(size, np.float32)]
            total = self._sums[slot]
            # The first gradient of a step is copied in: no zeroing pass needed.
            write_chunks(total, grad, add=self._arrived[slot] > 0)
            self._arrived[slot] += 1
            if self._arrived[slot] == self.world_size:
                np.multiply(total, 1.0 / self.world_size, out=total)
                self._arrived[slot] = 0
                self._completed[slot] = step
                self.steps += 1
                self._lock.notify_all()
            else:
                started = time.perf_counter()
                self._lock.wait_for(lambda: self._completed[slot] == step)
                self.wait_s += time.perf_counter() - started
        return _reply(total, len(grad))

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "wait_s": self.wait_s, "peak_rss_mb": _peak_rss_mb()}


class UpdatingServer(_Server):
    """Asynchronous, bounded staleness: applies gradients at most `max_staleness` versions old."""

    def __init__(self, world_size: int, max_staleness: int) -> None:
        super().__init__(world_size)
        self.max_staleness = max_staleness
        self.version = 0  # optimizer steps applied to this shard
        self.param: torch.Tensor | None = None
        self.applied = 0
        self.dropped = 0
        self.max_staleness_seen = 0  # dropped gradients included
        self.staleness: Counter[int] = Counter()  # staleness of every applied gradient -> count

    def init(self, params: np.ndarray, make_optimizer: Any) -> tuple[np.ndarray, int]:
        """The first worker's initial shard becomes the server's (all ranks start identical)."""
        with self._lock:
            if self.param is None:
                torch.set_num_threads(1)  # a server shares the node's cores with the workers
                self.param = torch.nn.Parameter(torch.from_numpy(params.copy()))
                self.param.grad = torch.zeros_like(self.param)
                self.optimizer = make_optimizer([self.param])
            return self.param.detach().numpy().copy(), self.version

    def push_pull(self, rank: int, version: int, lr: float, *grad: np.ndarray) -> list[Any]:
        """Apply `grad` (computed on `version`) unless too stale; reply shard chunks + version."""
        assert self.param is not None, "init() first"
        with self._lock:
            staleness = self.version - version
            self.max_staleness_seen = max(self.max_staleness_seen, staleness)
            if staleness > self.max_staleness:
                self.dropped += 1
            else:
                write_chunks(self.param.grad.numpy(), grad, add=False)
                for group in self.optimizer.param_groups:  # the worker's schedule sets the lr
                    group["lr"] = lr
                self.optimizer.step()
                self.version += 1
                self.applied += 1
                self.staleness[staleness] += 1
            # A copy: the reply may still be in flight when the next push updates the shard.
            shard = self.param.detach().numpy().copy()
            return [*np.array_split(shard, len(grad)), self.version]

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "applied": self.applied,
            "dropped": self.dropped,
            "max_staleness_applied": max(self.staleness, default=0),
            "max_staleness_seen": self.max_staleness_seen,
            "staleness_histogram": dict(sorted(self.staleness.items())),
            "optimizer_state_bytes": optimizer_state_bytes(getattr(self, "optimizer", None)),
            "peak_rss_mb": _peak_rss_mb(),
        }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

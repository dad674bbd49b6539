"""A shared-memory all-reduce for workers on one node, run as a DDP communication hook.

Written by hand because no installed library does it: gloo, torch's CPU backend, only has a TCP
transport, so each collective between two processes on one machine costs ~0.6 ms of loopback
latency before a byte moves (measured here: 0.61 ms for 4 bytes, 1.1 ms for 340 KB). On a small
model that is longer than the step. torch has no CPU shared-memory backend (oneCCL and
DeepSpeed's shm all-reduce need builds matching the installed torch). NCCL already uses NVLink or
shared memory between GPUs, so this is for CPU workers only.

One file in /dev/shm, mapped by every rank and unlinked as soon as all have mapped it (a crash
leaves nothing behind), holds a flag per rank and slots per rank. A small tensor (up to 1 MiB,
where latency dominates) takes one barrier:

    write my tensor into my slot    barrier    sum all slots in rank order into my tensor

alternating between two sets of slots, so the next call's writes never meet a slow rank's reads
of this one. A large tensor takes two barriers, so each rank sums only its share:

    write my tensor into my slot    barrier
    sum chunk `rank` over all slots in rank order into the result    barrier
    copy the result back into my tensor

Either way each element is summed in the same order on every rank, so every rank ends with
bitwise-equal gradients. The barrier is a sequence number per rank, each written only by its
rank, so no atomic read-modify-write is needed; x86's store ordering makes the slot data visible
before the flag that announces it, hence x86-64 only. A waiting rank spins briefly, then yields
the core (the workers may share cores with each other and with Ray) for up to `YIELD_FOR_S`;
a longer wait (a slower peer, a peer in its evaluation or checkpoint) naps instead, each nap at
most a tenth of the wait so far and at most 1 ms, so a rank waiting for a straggler does not burn
a core the straggler or the node's other processes could use (a yield loop returns at once on an
idle core: it spent 100 % of one), at a cost of at most 10 % of such a wait. It calls
`on_wait` with the missing ranks every `beat_s` (the worker turns that into a heartbeat, so the
driver's hang report names the rank that stopped, not the ones waiting for it), and raises after
`timeout_s` if a peer never arrives: the same contract as a gloo collective. A peer whose
process is gone (killed) is noticed within `LIVENESS_CHECK_S` instead, as gloo notices a closed
socket, so the survivors can heal the group at once (distrain/healing.py) rather than wait out
the timeout.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import platform
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

CACHE_LINE = 64
SPINS_BEFORE_YIELD = 200
YIELD_FOR_S = 0.002  # then nap: the wait is long (see the module docstring)
NAP_SHARE, MAX_NAP_S = 0.1, 0.001  # a nap: this share of the wait so far, at most MAX_NAP_S
SMALL_BYTES = 1 << 20  # up to this, the one-barrier path
LIVENESS_CHECK_S = 0.05  # while waiting: how often the late peers' processes are looked up


class PeerExited(ConnectionError):
    """A peer's process ended while this rank waited for it (a transport failure)."""


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces)
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _aligned(nbytes: int) -> int:
    return (nbytes + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


class ShmAllReduce:
    """Sum of a tensor over the ranks of the default process group, through shared memory.

    Collective: every rank constructs it together (it uses the process group once to share the
    file's name) and calls `all_reduce_sum_` in the same order with tensors of the same size.
    """

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        directory: str = "/dev/shm",
        on_wait: Callable[[list[int]], None] | None = None,
        beat_s: float = 1.0,
    ) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout_s, self.on_wait, self.beat_s = timeout_s, on_wait, beat_s
        self.slot_bytes = _aligned(max_bytes)
        self.small_bytes = min(self.slot_bytes, SMALL_BYTES)
        flags_bytes = CACHE_LINE * self.world_size  # a cache line per flag: no false sharing
        # Large slots per rank + the result, then two sets of small slots per rank.
        large, small = self.world_size + 1, 2 * self.world_size
        size = flags_bytes + self.slot_bytes * large + self.small_bytes * small
        name = [f"{directory}/distrain-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        path = name[0]
        error: list[str | None] = [None]
        if self.rank == 0:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    # Reserve the pages now: on a full tmpfs a later write would be a SIGBUS.
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
            except OSError as e:
                error[0] = f"cannot reserve {size} bytes in {directory}: {e}"
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            if self.rank == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise OSError(error[0])
        self.pids: list[int] = [0] * self.world_size  # one node: peers' pids can be looked up
        dist.all_gather_object(self.pids, os.getpid())
        fd = os.open(path, os.O_RDWR)
        self.buffer = mmap.mmap(fd, size)
        os.close(fd)
        dist.barrier()  # everyone has mapped it
        if self.rank == 0:
            os.unlink(path)
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8)
        # flags[i] is rank i's sequence number: int64 at the start of cache line i.
        words = np.frombuffer(self.buffer, dtype=np.int64, count=flags_bytes // 8)
        self.flags = words[:: CACHE_LINE // 8]
        offset = flags_bytes
        self._slots: list[torch.Tensor] = []  # large[0..W-1], result, small[0][..], small[1][..]
        for nbytes in [self.slot_bytes] * large + [self.small_bytes] * small:
            self._slots.append(raw[offset : offset + nbytes])
            offset += nbytes
        self.small_calls = 0
        self.sequence = 0

    def _view(self, index: int, like: torch.Tensor) -> torch.Tensor:
        return self._slots[index][: like.numel() * like.element_size()].view(like.dtype)

    def _barrier(self) -> None:
        self.sequence += 1
        flags, sequence = self.flags, self.sequence
        flags[self.rank] = sequence
        spins, started, deadline, beat, check = 0, 0.0, math.inf, math.inf, math.inf
        for rank in range(self.world_size):
            while flags[rank] < sequence:
                spins += 1
                if spins < SPINS_BEFORE_YIELD:
                    continue
                now = time.monotonic()
                if deadline == math.inf:
                    started, deadline, beat = now, now + self.timeout_s, now + self.beat_s
                    check = now + LIVENESS_CHECK_S
                waited_s = now - started
                if waited_s < YIELD_FOR_S:
                    os.sched_yield()  # let a peer that shares this core run
                else:
                    time.sleep(min(MAX_NAP_S, NAP_SHARE * waited_s))
                if now > check:
                    self._raise_if_exited(sequence)
                    check = now + LIVENESS_CHECK_S
                if now > beat and self.on_wait is not None:
                    self.on_wait(self._late(sequence))
                    beat = now + self.beat_s
                if now > deadline:
                    late = self._late(sequence)
                    raise TimeoutError(
                        f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                        f"{self.timeout_s:.0f} s (dead or stopped)"
                    )

    def _raise_if_exited(self, sequence: int) -> None:
        gone = [r for r in self._late(sequence) if not process_alive(self.pids[r])]
        if gone:
            pids = ", ".join(f"rank {r} (pid {self.pids[r]})" for r in gone)
            raise PeerExited(
                f"shared-memory all-reduce: {pids} exited while rank {self.rank} waited for it"
            )

    def _late(self, sequence: int) -> list[int]:
        return [r for r in range(self.world_size) if self.flags[r] < sequence]

    def _sum(
        self, slots: list[int], flat: torch.Tensor, lo: int, hi: int, out: torch.Tensor
    ) -> None:
        """out = sum over `slots` of their elements lo:hi, in slot (= rank) order."""
        views = [self._view(i, flat)[lo:hi] for i in slots]
        torch.add(views[0], views[1], out=out)
        for view in views[2:]:
            out.add_(view)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (contiguous, at most max_bytes) over the ranks, in place."""
        flat, world = tensor.view(-1), self.world_size
        n = flat.numel()
        if n * flat.element_size() <= self.small_bytes:
            first = world + 1 + (self.small_calls % 2) * world
            self.small_calls += 1
            slots = list(range(first, first + world))
            self._view(slots[self.rank], flat).copy_(flat)
            self._barrier()
            self._sum(slots, flat, 0, n, flat)
            return tensor
        self._view(self.rank, flat).copy_(flat)
        self._barrier()
        chunk = -(-n // world)
        lo, hi = self.rank * chunk, min((self.rank + 1) * chunk, n)
        if lo < hi:
            self._sum(list(range(world)), flat, lo, hi, self._view(world, flat)[lo:hi])
        self._barrier()
        flat.copy_(self._view(world, flat))
        return tensor

    def close(self) -> None:
        self._slots = []
        self.flags = None  # type: ignore[assignment]
        # A tensor view still alive keeps the mapping: it goes with the process then.
        with contextlib.suppress(BufferError):
            self.buffer.close()

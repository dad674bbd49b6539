"""A torch.distributed process group formed without a refused connection.

`init_process_group(init_method="tcp://...")` has rank 0 open the group's TCPStore while the
other ranks connect to it. A rank that connects before rank 0 listens is refused, and torch
retries after an exponential backoff with jitter: measured here, 0.3-0.7 s added to every group
start, heal and restart on one node (two ranks, rank 0 late by 50 ms: 0.67 s in the store). The
ranks reach the rendezvous in no set order, so it happened to about half the groups.

Here rank 0's store is listening before any rank learns where it is (torchrun's agent does the
same): `serve` is what the driver's `rendezvous` asks rank 0's actor for; the server binds
port 0, so no port is picked, freed and taken by another process in between (EADDRINUSE). `join`
then connects every rank, rank 0 through the server it holds.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

# The server `serve` opened in this process, until rank 0 joins with it: the handoff between two
# actor calls (the driver's rendezvous, then the worker's setup). One at a time: a rendezvous
# whose group never formed (its setup failed) is dropped by the next.
_served: dist.TCPStore | None = None


def serve(timeout_s: float) -> dict[str, Any]:
    """Rank 0's side, before the others are told: a TCPStore listening on this node's IP as
    Ray sees it (not localhost, so other nodes reach it), on a port the system picks."""
    global _served
    host = ray.util.get_node_ip_address()
    _served = None  # the previous one closes
    _served = dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    return {"master_addr": host, "master_port": _served.port}


def join(
    backend: str,
    rendezvous: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    timeout_s: float,
    device_id: torch.device | None = None,
) -> None:
    """Join the default process group through the store `rendezvous` names. Rank 0 uses the
    server `serve` opened; without one (a group formed outside a Ray actor, as in unit tests)
    it opens it now, as `init_method="tcp://..."` would."""
    global _served
    port = rendezvous["master_port"]
    store = None
    if rank == 0 and _served is not None and _served.port == port:
        store, _served = _served, None
    if store is None:
        store = dist.TCPStore(
            rendezvous["master_addr"],
            port,
            world_size,
            is_master=rank == 0,
            timeout=timedelta(seconds=timeout_s),
        )
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **({"device_id": device_id} if device_id is not None else {}),
    )

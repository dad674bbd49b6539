"""A process group's store is listening before any rank is told its address (real processes,
a real gloo group): no rank's connect is refused, so none waits out torch's retry backoff."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrain.aggregators import process_group


@pytest.fixture
def served() -> dict:
    rendezvous = process_group.serve(timeout_s=10)
    yield rendezvous
    process_group._served = None  # close the server this test opened in pytest's process


def test_the_store_listens_before_its_address_is_handed_out(served: dict) -> None:
    # With a port merely found free (the old rendezvous), this connect was refused.
    with socket.create_connection((served["master_addr"], served["master_port"]), timeout=5):
        pass


def test_a_new_rendezvous_drops_one_whose_group_never_formed(served: dict) -> None:
    again = process_group.serve(timeout_s=10)
    assert process_group._served is not None
    assert process_group._served.port == again["master_port"]


def _rank(rank: int, queue: mp.Queue, out: str) -> None:
    torch.set_num_threads(1)
    if rank == 0:
        rendezvous = process_group.serve(timeout_s=30)
        queue.put(rendezvous)
        time.sleep(0.3)  # rank 1 connects first: rank 0's server must already be listening
    else:
        rendezvous = queue.get(timeout=30)
    process_group.join("gloo", rendezvous, rank=rank, world_size=2, timeout_s=30)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    Path(out, f"rank{rank}.json").write_text(json.dumps(total.item()))
    dist.destroy_process_group()


def test_a_rank_that_arrives_first_joins_rank_0s_store(tmp_path: Path) -> None:
    # Rank 0 joins through the server it opened (binding its port again would fail).
    queue = mp.get_context("spawn").Queue()
    mp.spawn(_rank, args=(queue, str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3.0, 3.0]

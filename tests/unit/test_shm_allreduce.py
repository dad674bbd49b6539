"""The shared-memory all-reduce between real processes in a real gloo process group."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrain.aggregators import shm_allreduce
from distrain.aggregators.shm_allreduce import SMALL_BYTES, ShmAllReduce

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(), reason="x86-64 Linux only")

# Numbers of float32 elements: small (one-barrier path), odd-sized, large (two barriers), and a
# chunk split that leaves the last rank nothing (4 elements over 3 ranks: chunks 2, 2, 0).
SIZES = [10, 4, SMALL_BYTES // 4 + 7, 1000, 3 * SMALL_BYTES // 4, 4, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _inputs(rank: int, size: int, call: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(size, generator=generator)


def _sum_ranks(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    shm = ShmAllReduce(max(SIZES) * 4, timeout_s=30)
    results = []
    for call, size in enumerate(SIZES):
        tensor = _inputs(rank, size, call)
        shm.all_reduce_sum_(tensor)
        results.append(tensor)
    shm.close()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _late_rank(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    waits: list[list[int]] = []
    shm = ShmAllReduce(1024, timeout_s=1.0, on_wait=waits.append, beat_s=0.2)
    if rank == 0:
        try:
            shm.all_reduce_sum_(torch.ones(8))
        except TimeoutError as error:
            Path(out, "error.txt").write_text(str(error))
            Path(out, "waits.json").write_text(json.dumps(waits))
    dist.barrier()  # rank 1 never joined the all-reduce; it waits here for rank 0's verdict
    dist.destroy_process_group()


def _exiting_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    _init(rank, world, port)
    shm = ShmAllReduce(1024, timeout_s=300)
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1:
        os._exit(0)  # as a SIGKILLed worker: gone, never arriving at the all-reduce
    try:
        shm.all_reduce_sum_(torch.ones(8))
    except shm_allreduce.PeerExited as error:
        Path(out, "error.txt").write_text(str(error))
    os._exit(0)  # the group has a dead member: nothing to tear down collectively


def _slow_peer(rank: int, world: int, port: int, out: str) -> None:
    import time

    _init(rank, world, port)
    shm = ShmAllReduce(1024, timeout_s=30)
    tensor = torch.full((8,), float(rank + 1))
    if rank == 1:
        time.sleep(0.5)  # a straggler: rank 0 waits for it
    started_s, cpu_started_s = time.monotonic(), time.thread_time()
    shm.all_reduce_sum_(tensor)
    waited = {"wall_s": time.monotonic() - started_s, "cpu_s": time.thread_time() - cpu_started_s}
    Path(out, f"rank{rank}.json").write_text(json.dumps({**waited, "sum": tensor.tolist()}))
    shm.close()
    dist.destroy_process_group()


def _no_room(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        ShmAllReduce(1024, timeout_s=5, directory=f"{out}/missing-directory")
    except OSError as error:
        Path(out, f"error{rank}.txt").write_text(str(error))
    dist.destroy_process_group()


def _shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("distrain-*")}


@pytest.mark.parametrize("world", [2, 3])
def test_sums_are_exact_and_bitwise_equal_on_every_rank(tmp_path: Path, world: int) -> None:
    before = _shm_files()
    mp.spawn(_sum_ranks, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for call, size in enumerate(SIZES):
        expected = _inputs(0, size, call)
        for r in range(1, world):
            expected = expected + _inputs(r, size, call)  # rank order, as the reduction
        for r in range(world):
            assert torch.equal(per_rank[r][call], expected), (world, call, size, r)
    assert _shm_files() == before  # the segment was unlinked once everyone had mapped it


def test_a_missing_rank_raises_after_the_timeout_instead_of_hanging(tmp_path: Path) -> None:
    mp.spawn(_late_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    assert "rank(s) [1] did not arrive within 1 s" in (tmp_path / "error.txt").read_text()
    # While it waited, rank 0 said whom it was waiting for, about every beat_s (0.2 s).
    waits = json.loads((tmp_path / "waits.json").read_text())
    assert 3 <= len(waits) <= 6 and all(w == [1] for w in waits)


def test_a_rank_waiting_for_a_slow_peer_does_not_burn_a_core(tmp_path: Path) -> None:
    """Half a second behind a straggler: a yield loop spends it all on the CPU (as the transport
    did); napping after the first milliseconds spends a few percent of it."""
    mp.spawn(_slow_peer, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    waiting = json.loads((tmp_path / "rank0.json").read_text())
    assert waiting["sum"] == [3.0] * 8
    assert waiting["wall_s"] > 0.3, waiting  # it did wait for rank 1
    assert waiting["cpu_s"] < 0.1 * waiting["wall_s"], waiting


def test_no_room_for_the_segment_is_the_same_error_on_every_rank(tmp_path: Path) -> None:
    """What a full tmpfs gives (so the aggregator falls back to gloo on all ranks together)."""
    mp.spawn(_no_room, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert "cannot reserve" in (tmp_path / f"error{rank}.txt").read_text()


def test_a_peer_that_exited_is_noticed_without_waiting_for_the_timeout(tmp_path: Path) -> None:
    """A survivor's all-reduce ends as soon as it sees the peer's process gone (the way gloo
    sees a closed socket), so the group can heal at once; the timeout here is 300 s."""
    mp.spawn(_exiting_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    pid = (tmp_path / "pid1").read_text()
    assert (tmp_path / "error.txt").read_text() == (
        f"shared-memory all-reduce: rank 1 (pid {pid}) exited while rank 0 waited for it"
    )


def test_process_alive_tells_a_running_process_from_a_gone_one() -> None:
    import os
    import subprocess
    import sys

    assert shm_allreduce.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not shm_allreduce.process_alive(child.pid)  # reaped: no /proc entry
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{zombie.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # exited, not yet reaped: a zombie is not alive either
    assert not shm_allreduce.process_alive(zombie.pid)
    zombie.wait()

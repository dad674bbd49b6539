"""Which aggregators can heal a group in place (every rank must hold the whole training state),
and which process a heal may kill by pid."""

import subprocess
import time
from pathlib import Path

import pytest

from distrain import healing
from distrain.aggregators.allreduce import AllReduce
from distrain.aggregators.fsdp import FSDP
from distrain.aggregators.parameter_server import ParameterServer


@pytest.mark.parametrize(
    ("aggregator", "config", "shard_optimizer", "heals"),
    [
        (AllReduce, {"compression": "none"}, False, True),
        (AllReduce, {"compression": "bf16"}, False, True),  # stateless compression
        (AllReduce, {"compression": "powersgd"}, False, False),  # per-rank error feedback
        (AllReduce, {"compression": "none"}, True, False),  # ZeRO: optimizer state sharded
        (FSDP, {}, False, False),  # parameters sharded
        (ParameterServer, {}, False, False),  # the state lives on the servers
    ],
)
def test_only_replicas_heal_in_place(
    aggregator: type, config: dict, shard_optimizer: bool, heals: bool
) -> None:
    assert aggregator.heals_in_place(config, shard_optimizer=shard_optimizer) is heals


@pytest.mark.parametrize(
    ("title", "is_worker"),
    [
        ("ray::Worker", True),  # an idle Worker actor
        ("ray::Worker.fit", True),  # one running a method
        ("ray::WorkerGroupSink.add", False),  # another actor whose name starts the same
        ("ray::IDLE", False),  # a pooled process the pid may now belong to
        ("python -m Worker", False),
    ],
)
def test_only_a_worker_actors_process_is_killed_by_pid(title: str, is_worker: bool) -> None:
    """A failed rank's pid may have been reused by the time a heal kills it: the title decides."""
    process = subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 30"])
    try:
        deadline = time.monotonic() + 5
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        while not cmdline.read_bytes().startswith(title.encode() + b"\0"):  # exec'd with it
            assert time.monotonic() < deadline, cmdline.read_bytes()
            time.sleep(0.01)
        assert healing._is_worker_process(process.pid) is is_worker
    finally:
        process.kill()
        process.wait()
    assert healing._is_worker_process(process.pid) is False  # gone

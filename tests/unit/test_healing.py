"""Which aggregators can heal a group in place: every rank must hold the whole training state."""

import pytest

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

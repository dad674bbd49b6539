"""DISTRAIN_SLOW_RANK and DISTRAIN_SLOW_CHECK_S: slowness made on purpose, outside the job's
config."""

from __future__ import annotations

import pytest

from distrain.config import TrainerConfig
from distrain.errors import ConfigError
from distrain.simulate import SlowRank, check_delay_s_from_env, slow_rank_from_env


def test_unset_or_empty_slows_nothing() -> None:
    assert slow_rank_from_env(2, {}) is None
    assert slow_rank_from_env(2, {"DISTRAIN_SLOW_RANK": " "}) is None


def test_rank_and_seconds_slow_that_rank_only() -> None:
    slow = slow_rank_from_env(2, {"DISTRAIN_SLOW_RANK": "1:0.03"})
    assert slow == SlowRank(rank=1, step_delay_s=0.03)
    assert (slow.delay_s(0), slow.delay_s(1)) == (0.0, 0.03)


@pytest.mark.parametrize("value", ["2:0.01", "-1:0.01", "1", "x:0.1", "1:-0.5", "1:fast"])
def test_a_bad_value_is_named_with_what_is_allowed(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        slow_rank_from_env(2, {"DISTRAIN_SLOW_RANK": value})
    message = str(raised.value)
    assert f"DISTRAIN_SLOW_RANK={value!r}" in message and "trainer.workers=2" in message
    assert "RANK:SECONDS" in message


def test_a_slow_check_waits_the_seconds_given() -> None:
    assert check_delay_s_from_env({}) == 0.0
    assert check_delay_s_from_env({"DISTRAIN_SLOW_CHECK_S": " "}) == 0.0
    assert check_delay_s_from_env({"DISTRAIN_SLOW_CHECK_S": "2.5"}) == 2.5


@pytest.mark.parametrize("value", ["-1", "soon", "1e9"])
def test_a_bad_check_delay_is_named_with_what_is_allowed(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_delay_s_from_env({"DISTRAIN_SLOW_CHECK_S": value})
    assert f"DISTRAIN_SLOW_CHECK_S={value!r} is not allowed" in str(raised.value)


def test_it_is_not_part_of_the_config_schema() -> None:
    assert not [name for name in TrainerConfig.__dataclass_fields__ if "delay" in name]

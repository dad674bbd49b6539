"""The embedded Ray's dashboard agent goes on a free port (distrain/ray_agent_port.py); the
end-to-end proof, with Ray's default port taken, is test_cli's Ctrl-C test."""

from __future__ import annotations

import pytest
from ray._private.parameter import RayParams

from distrain.ray_agent_port import agent_on_any_free_port


def test_ray_start_parameters_take_any_free_agent_port_only_within() -> None:
    default = RayParams().dashboard_agent_listen_port
    assert default not in (0, None)  # Ray's fixed port: what the block changes
    with agent_on_any_free_port():
        assert RayParams().dashboard_agent_listen_port == 0
        named = RayParams(dashboard_agent_listen_port=61000)
        assert named.dashboard_agent_listen_port == 61000  # a port the caller names stands
    assert RayParams().dashboard_agent_listen_port == default


def test_ray_start_parameters_are_restored_after_an_error() -> None:
    original = RayParams.__init__
    with pytest.raises(RuntimeError), agent_on_any_free_port():
        raise RuntimeError("ray.init failed")
    assert RayParams.__init__ is original

"""The interface that holds an address, on this machine's real interfaces (`ip` as the oracle)."""

from __future__ import annotations

import os

import pytest

from distrain import network
from tests.test_launch import _ipv4_interfaces  # `ip -4 -brief addr`, parsed


def test_every_interface_is_found_by_its_address() -> None:
    interfaces = _ipv4_interfaces()
    assert interfaces, "no IPv4 interface at all"
    for name, address in interfaces.items():
        assert network.ipv4_of(name) == address
        assert network.interface_of(address) == name


def test_an_address_no_interface_holds() -> None:
    assert network.interface_of("203.0.113.77") is None  # TEST-NET-3: never configured here
    assert network.ipv4_of("no-such-if0") is None


def test_bind_collectives_prefers_the_setting_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bind_collectives writes os.environ itself; set each variable through monkeypatch first, so
    # that its value before the test (most often: unset) is what teardown restores. A plain
    # delenv of an unset variable records nothing, and "lo" then leaked into every later test's
    # subprocesses (the two-host run bound gloo to loopback when it ran after this test).
    for var in network.SOCKET_IFNAME_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert network.bind_collectives(None, "127.0.0.1") == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the cluster's own choice is kept
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    network.bind_collectives(None, "127.0.0.1")
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert network.bind_collectives("eth7", "127.0.0.1") == "eth7"  # cluster.socket_ifname wins
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "eth7"
    assert network.bind_collectives(None, "203.0.113.77") is None


def test_the_environment_is_restored_after_the_binding_test() -> None:
    """Runs after the test above (file order): nothing it set is left in this process."""
    assert os.environ.get("GLOO_SOCKET_IFNAME") != "lo"
    assert os.environ.get("NCCL_SOCKET_IFNAME") not in ("lo", "ib0", "eth7")

"""The interface that holds an address, on this machine's real interfaces (`ip` as the oracle)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from distrain import network


def _ipv4_interfaces() -> dict[str, str]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed")
    out = subprocess.run(["ip", "-4", "-brief", "addr"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            found[fields[0].split("@")[0]] = fields[2].split("/")[0]
    return found


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
    for var in network.SOCKET_IFNAME_VARS:
        monkeypatch.delenv(var, raising=False)
    assert network.bind_collectives(None, "127.0.0.1") == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the cluster's own choice is kept
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    network.bind_collectives(None, "127.0.0.1")
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert network.bind_collectives("eth7", "127.0.0.1") == "eth7"  # cluster.socket_ifname wins
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "eth7"
    assert network.bind_collectives(None, "203.0.113.77") is None

"""Which network interface holds an address: where a worker's collectives should listen.

gloo (and NCCL's bootstrap) pick their interface from the host name when no *_SOCKET_IFNAME is
set, and on many Debian/Ubuntu machines the host name resolves to 127.0.0.1: a worker on a
second host then offers its peers a loopback address and the run fails with
`Gloo connectFullMesh failed ... remote=[127.0.0.1]`. Ray already knows each node's reachable
address (the node IP); binding the collectives to the interface that holds it makes multi-host
runs work with no setting. Written here with the kernel's own interface table (SIOCGIFADDR),
because the standard library has no address-to-interface lookup and psutil is not a dependency.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def ipv4_of(interface: str) -> str | None:
    """The IPv4 address of `interface`, or None (no such interface, or no IPv4 on it)."""
    request = struct.pack("256s", interface.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
        except OSError:
            return None
    return socket.inet_ntoa(reply[20:24])


def interface_of(address: str) -> str | None:
    """The name of the interface whose IPv4 address is `address`, or None if none holds it
    (an IPv6 node address, a secondary address, a platform without SIOCGIFADDR)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if ipv4_of(name) == address), None)


SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def bind_collectives(socket_ifname: str | None, node_ip: str) -> str | None:
    """Set the interface gloo and NCCL listen on, in this worker process; returns it.

    `cluster.socket_ifname` wins; otherwise the interface holding the node's IP, unless the
    environment already names one (a cluster's own NCCL_SOCKET_IFNAME is kept).
    """
    if socket_ifname:
        for var in SOCKET_IFNAME_VARS:
            os.environ[var] = socket_ifname
        return socket_ifname
    found = interface_of(node_ip)
    if found:
        for var in SOCKET_IFNAME_VARS:
            os.environ.setdefault(var, found)
    return found

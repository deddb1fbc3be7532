"""Open TUN devices and move them into network namespaces.

The forwarder owns the TUN file descriptors: as long as they stay open the devices exist, and
when the forwarder dies the kernel deletes them, so a crashed run cannot leave interfaces behind.
A device keeps working after ``ip link set DEV netns NS`` because the fd is bound to the device
object, not to its name or namespace.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tun(name: str) -> int:
    """Create a TUN device called *name* in the current namespace and return its non-blocking fd.

    IFF_NO_PI strips the 4-byte packet-info header so every read returns exactly one IP packet,
    which is what the shaper accounts for (rates count IP bytes).
    """
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd


def move_to_netns(dev: str, netns: str, new_name: str) -> None:
    """Move *dev* into *netns* and rename it there.

    Devices are created with a per-run unique name in the root namespace (so parallel runs do
    not collide) and get a short stable name (tunA/tunB) once inside their private namespace.
    """
    subprocess.run(["ip", "link", "set", dev, "netns", netns], check=True, timeout=10)
    subprocess.run(
        ["ip", "-n", netns, "link", "set", dev, "name", new_name], check=True, timeout=10
    )

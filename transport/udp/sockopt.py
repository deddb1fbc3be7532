"""UDP socket set-up for bulk data: large buffers, UDP GSO and GRO where Linux has them.

* Buffers: a 208 KiB default receive buffer overflows at a few hundred MB/s (aioquic and
  qh3 lost half their speed to it; quic-go asks for 7 MiB, quic-go issue 2255). As
  root, ``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE`` pass the ``net.core.rmem_max`` cap;
  otherwise ``SO_RCVBUF``/``SO_SNDBUF`` are capped there, and a warning (once per
  process) names the sysctl to raise.
* GSO (``UDP_SEGMENT``, Linux 4.18): one ``sendmsg`` carries up to 64 datagrams of one
  size (the last may be shorter) in a 64 KiB buffer; the segment size goes in a
  ``SOL_UDP``/``UDP_SEGMENT`` control message per call.
* GRO (``UDP_GRO``, Linux 5.0): one ``recvmsg`` returns several datagrams of one flow
  back to back, with their size in a ``SOL_UDP``/``UDP_GRO`` control message.

* Receive timestamps (``SO_TIMESTAMPNS``, Linux 2.6.22): each ``recvmsg`` carries the
  time the kernel took the datagram in (``CLOCK_REALTIME``, a ``struct timespec``), so
  one-way delay excludes the time it then waited for this process (``rx_timestamp``).

Each feature is probed on the socket itself and skipped cleanly where missing.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass

log = logging.getLogger("transport.udp")

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # = SCM_TIMESTAMPNS (socket(7))
GSO_MAX_BYTES = 65000          # keep a GSO send under the 64 KiB IP payload limit
GSO_MAX_SEGMENTS = 64          # UDP_MAX_SEGMENTS on older kernels
GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
TS_CMSG_SPACE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0
_SEG = struct.Struct("=H")
_TIMESPEC = struct.Struct("=qq")  # struct timespec on 64-bit Linux
_INT = struct.Struct("=i")
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class SocketFeatures:
    """What the socket got: GSO/GRO on or off, buffer sizes the kernel reports (bytes)."""

    gso: bool
    gro: bool
    rcvbuf: int
    sndbuf: int
    notes: tuple[str, ...] = ()
    rx_timestamps: bool = False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    if size <= 0:
        return int(sock.getsockopt(socket.SOL_SOCKET, plain))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return int(sock.getsockopt(socket.SOL_SOCKET, plain))
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)
    except OSError:
        pass
    return int(sock.getsockopt(socket.SOL_SOCKET, plain))


def configure(sock: socket.socket, *, rcvbuf: int = 32 << 20, sndbuf: int = 4 << 20,
              gso: bool = True, gro: bool = True, timestamps: bool = True) -> SocketFeatures:
    """Set buffers and probe GSO/GRO on ``sock`` (a UDP socket); never raises for a
    missing feature. Linux reports twice the size set (its bookkeeping share)."""
    notes: list[str] = []
    got_r = _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
    got_s = _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
    if rcvbuf > 0 and got_r < rcvbuf:
        msg = (f"UDP receive buffer capped at {got_r} bytes (asked {rcvbuf}): raise "
               "net.core.rmem_max, or expect drops above a few hundred MB/s")
        notes.append(msg)
        _warn_once("rcvbuf", msg)
    if sndbuf > 0 and got_s < sndbuf:
        notes.append(f"UDP send buffer capped at {got_s} bytes (asked {sndbuf})")
    use_gso = use_gro = use_ts = False
    if sys.platform.startswith("linux"):
        if timestamps and struct.calcsize("l") == 8:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                use_ts = True
            except OSError:
                notes.append("receive timestamps (SO_TIMESTAMPNS) unavailable")
        if gso:
            try:
                sock.getsockopt(SOL_UDP, UDP_SEGMENT)
                use_gso = True
            except OSError:
                notes.append("UDP GSO unavailable (kernel before 4.18)")
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                use_gro = True
            except OSError:
                notes.append("UDP GRO unavailable (kernel before 5.0)")
    return SocketFeatures(use_gso, use_gro, got_r, got_s, tuple(notes), use_ts)


def gso_cmsg(segment: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data asking the kernel to cut a send into ``segment``-byte datagrams."""
    return [(SOL_UDP, UDP_SEGMENT, _SEG.pack(segment))]


def gro_segment(ancdata: list[tuple[int, int, bytes]], default: int) -> int:
    """The datagram size of a coalesced GRO read, or ``default`` (a single datagram)."""
    for level, type_, data in ancdata:
        if level == SOL_UDP and type_ == UDP_GRO and len(data) >= 4:
            size = int(_INT.unpack_from(data)[0])
            return size if size > 0 else default
    return default


def rx_timestamp(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The kernel's receive time of a ``recvmsg`` (``time.time()`` seconds), or None."""
    for level, type_, data in ancdata:
        if level == socket.SOL_SOCKET and type_ == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return float(sec + nsec * 1e-9)
    return None


def max_gso_segments(datagram_size: int) -> int:
    """How many datagrams one GSO send may carry at this size (1 when GSO is pointless)."""
    return max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // datagram_size))


IP_MTU = getattr(socket, "IP_MTU", 14)        # ip(7), linux/in.h
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)    # ipv6(7), linux/in6.h
MAX_AUTO_DATAGRAM = 65000
"""Largest datagram path MTU discovery asks for: one GSO send's worth (``GSO_MAX_BYTES``),
under the 65,507-byte IPv4 UDP limit."""


def route_max_datagram(family: int, addr: tuple[object, ...]) -> int | None:
    """The largest UDP payload (bytes) the route to ``addr`` carries without IP
    fragmentation, as this host knows it: the path MTU the kernel holds for the route
    (``IP_MTU``/``IPV6_MTU`` on a connected socket, ip(7)/ipv6(7): the outgoing
    interface's MTU, or less once an ICMP "fragmentation needed" lowered it) minus the
    IP (20 or 40 bytes) and UDP (8) headers, at most ``MAX_AUTO_DATAGRAM``. Hops beyond
    the first may carry less: the caller probes before it uses it (RFC 8899). None
    where the kernel does not say (not Linux, no route). Connecting a UDP socket sends
    nothing."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            if family == socket.AF_INET6:
                mtu, headers = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU), 48
            else:
                mtu, headers = sock.getsockopt(socket.IPPROTO_IP, IP_MTU), 28
    except OSError:
        return None
    if mtu <= headers:
        return None
    return min(mtu - headers, MAX_AUTO_DATAGRAM)


BULK_MMAP_THRESHOLD = 32 << 20
"""mmap threshold for a process moving blocks over HTTP (the daemon, the CLI's transfer):
above the largest block read whole (4 MiB and its ``bytes`` header, which the default
threshold of ``tune_malloc`` would still map afresh) and the stream chunks aiohttp hands
over (~64-256 KiB). Without it a 2 GiB loopback download took 100,000 page faults
(``/usr/bin/time``) and 4,000 ``brk`` calls (``strace -c``) in the client."""


def tune_malloc(mmap_threshold: int = 4 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc keep freed 64 KiB blocks instead of returning them to the kernel.

    Every received datagram is decrypted into a new ``bytes`` (the owner keeps views of
    it). glibc returns a freed top-of-heap chunk above 128 KiB to the kernel and maps
    blocks above its mmap threshold afresh, so with 65,000-byte datagrams each decrypt
    paid page faults: measured here, 22 us per ``decrypt`` instead of 9 (the receiver's
    largest cost). Process-wide and glibc-only; returns False where it does not apply.
    Call once at start in a process that moves bulk data (the daemon, the bench).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
        return bool(ok and libc.mallopt(m_trim_threshold, trim_threshold) == 1)
    except (OSError, AttributeError):
        return False

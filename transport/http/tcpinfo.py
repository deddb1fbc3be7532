"""A TCP socket's own view of the path (``TCP_INFO``) and its pacing cap (``SO_MAX_PACING_RATE``).

Linux only; elsewhere ``read_tcp_info`` returns None and ``set_max_pacing_rate``
returns False, and the streams run as TCP alone would run them.
"""

from __future__ import annotations

import math
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from transport.blocks.share import TcpSample

TCP_INFO = getattr(socket, "TCP_INFO", 11)
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # asm-generic/socket.h

# struct tcp_info (include/uapi/linux/tcp.h) up to tcpi_delivery_rate: 8 bytes of u8 fields,
# then 24 u32 (tcpi_rto .. tcpi_total_retrans), 4 u64 (pacing_rate, max_pacing_rate,
# bytes_acked, bytes_received), 6 u32 (segs_out .. data_segs_out), u64 delivery_rate.
_INFO = struct.Struct("=8B24I4Q6IQ")
_LAST_ACK_RECV, _RTT, _TOTAL_RETRANS = 8 + 12, 8 + 15, 8 + 23
_BYTES_ACKED, _MIN_RTT, _DELIVERY_RATE = 8 + 24 + 2, 8 + 24 + 4 + 3, 8 + 24 + 4 + 6


class SockLike(Protocol):
    """What ``TCP_INFO`` needs of a socket: ``socket.socket``, asyncio's
    ``TransportSocket``, uvloop's pseudo-socket (``transport.get_extra_info("socket")``)."""

    def getsockopt(self, level: int, optname: int, buflen: int = ..., /) -> Any: ...

    def setsockopt(self, level: int, optname: int, value: Any, /) -> None: ...


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The fields the share controllers use; seconds and bits/s.

    ``last_ack_recv``: seconds since the last ACK arrived (``tcpi_last_ack_recv``);
    ``acked``: bytes acknowledged (``tcpi_bytes_acked``).
    """

    rtt: float
    min_rtt: float
    retrans: int
    delivery_rate: float
    last_ack_recv: float
    acked: int = 0

    def sample(self) -> TcpSample:
        return TcpSample(self.rtt, self.min_rtt, self.retrans, self.delivery_rate, self.acked)


def read_tcp_info(sock: SockLike | None) -> TcpInfo | None:
    """``TCP_INFO`` of a connected TCP socket, None where the kernel does not offer it
    (not Linux, an older kernel's shorter struct, a closed socket)."""
    if sock is None or not sys.platform.startswith("linux"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _INFO.size)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(raw, bytes | bytearray) or len(raw) < _INFO.size:
        return None
    f = _INFO.unpack_from(raw)
    return TcpInfo(rtt=f[_RTT] / 1e6, min_rtt=f[_MIN_RTT] / 1e6, retrans=f[_TOTAL_RETRANS],
                   delivery_rate=f[_DELIVERY_RATE] * 8.0, last_ack_recv=f[_LAST_ACK_RECV] / 1e3,
                   acked=f[_BYTES_ACKED])


def set_max_pacing_rate(sock: SockLike | None, rate_bps: float) -> bool:
    """Cap what the kernel sends on ``sock`` to ``rate_bps`` (bits/s; ``math.inf``: no cap).
    TCP paces itself under a cap (internal pacing, Linux 4.13+, no ``fq`` needed).
    False when the socket refuses."""
    if sock is None or not sys.platform.startswith("linux"):
        return False
    value = 0xFFFFFFFF if rate_bps == math.inf else max(1, min(0xFFFFFFFE, int(rate_bps / 8)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, value)
    except (OSError, ValueError, TypeError):
        return False
    return True

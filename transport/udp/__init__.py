"""Bulk data over UDP (port 33001): a sans-IO core and an asyncio adapter.

``codec`` (datagram format), ``crypto`` (keys, AEAD, replay window), ``recovery``
(acknowledgements, RTT, loss), ``rate`` (controllers, pacing), ``connection``
(``UdpConnection``) are sans-IO: no sockets, no clock, no asyncio. ``aio`` drives them
over real sockets. Nothing here imports ``fallback`` or ``transport.http``.
"""

from __future__ import annotations

from transport.udp.connection import UdpConnection
from transport.udp.crypto import PathKeys, X25519Exchange, derive_path_keys, new_path_secret
from transport.udp.events import (
    Closed,
    Event,
    MtuRaised,
    PathResumed,
    PathSilent,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    ProbeAnswered,
    SendReady,
    Stats,
    UdpConfig,
)
from transport.udp.rate import RateConfig

DEFAULT_PORT = 33001

__all__ = ["DEFAULT_PORT", "UdpConnection", "UdpConfig", "RateConfig", "PathKeys",
           "X25519Exchange", "derive_path_keys", "new_path_secret", "Event", "Closed", "MtuRaised",
           "PathResumed", "PathSilent", "PiecesAcked", "PiecesLost", "PiecesReceived",
           "ProbeAnswered", "SendReady", "Stats"]

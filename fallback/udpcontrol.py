"""The UDP path's control call: ``POST /.fallback/v1/session/{id}/udp`` (docs/protocol.md).

The client asks for a UDP path of its session (``UdpRequest``); the daemon answers
with a fresh connection id, the key material, its UDP port, the datagram size and
the flow that applies (``UdpOffer``). Key agreement:

* over HTTPS the daemon draws a fresh 32-byte path secret (``new_path_secret``) and
  returns it (``key``): the TLS channel, authenticated by the session token, keeps
  it secret;
* over plain HTTP the client sends an X25519 public key (``x25519``) and the daemon
  answers with its own; each side derives the path secret with
  ``X25519Exchange.path_secret`` (RFC 7748, HKDF bound to both keys and the session
  id). Only public keys cross the channel: an eavesdropper learns nothing it could
  open a datagram with. The daemon refuses a plain-HTTP request without ``x25519``.

Both ends then derive per-direction AES-256-GCM keys from the secret
(``transport.udp.crypto.derive_path_keys``; the client is the initiator).

Pieces carry ``(file, block, offset, payload)``. A block's 32-byte BLAKE3 digest,
which HTTP frames carry in the piece header, travels as a piece of its own at
``DIGEST_OFFSET`` (no block is that large: ``transport.blocks.layout``'s maximum
is far below 4 GiB), so the receiver's assembler can verify the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fallback.control import Flow, _int, _obj, _str
from transport.errors import ProtocolError
from transport.udp.codec import DEFAULT_DATAGRAM, MAX_DATAGRAM, MIN_DATAGRAM

FEATURE = "udp1"
"""The ``/info`` feature naming this call and the datagram conventions below."""
FEATURE_HOLES = "udp2"
"""The ``/info`` feature of a daemon that speaks datagram format version 2 (hole pieces:
a block lying wholly in a hole of its file crosses as 18 bytes, not as its zeros). A
client that sees it asks for ``version: 2``; the answer's ``version`` is what both ends
then speak (1 from a daemon that does not know the key)."""
MAX_VERSION = 2
"""The highest datagram format version this end speaks (``transport.udp.codec.VERSIONS``)."""
DIGEST_OFFSET = (1 << 32) - 32
"""Offset of the piece that carries a block's digest (its 32 bytes end at 2**32)."""
DIGEST_SIZE = 32


def _hex(d: dict[str, Any], key: str, where: str, size: int) -> bytes | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 2 * size:
        raise ProtocolError(f"{where}: {key} must be {size} bytes in hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{where}: {key} must be {size} bytes in hex") from None


@dataclass(frozen=True, slots=True)
class UdpRequest:
    """``{datagram_size, base_datagram_size?, x25519?, flow?, version?}``: the datagram
    size the client wants (UDP payload bytes, ``-Z``), its X25519 public key (32 bytes,
    hex; required over plain HTTP), the flow it asks for (the server's caps win) and the
    highest datagram format version it speaks (1 when absent; 2: hole pieces).

    ``base_datagram_size`` (optional, ≤ ``datagram_size``): both ends send datagrams of
    this size until a PROBE of ``datagram_size`` bytes crossed their direction of the
    path (``UdpConfig.initial_datagram_size``: path MTU discovery); absent, both send
    ``datagram_size`` from the start (a size the user set with ``-Z``)."""

    datagram_size: int = DEFAULT_DATAGRAM
    x25519: bytes | None = None
    flow: Flow | None = None
    version: int = 1
    base_datagram_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"datagram_size": self.datagram_size}
        if self.version != 1:
            out["version"] = self.version
        if self.base_datagram_size is not None:
            out["base_datagram_size"] = self.base_datagram_size
        if self.x25519 is not None:
            out["x25519"] = self.x25519.hex()
        if self.flow is not None:
            out["flow"] = self.flow.to_json()
        return out

    @classmethod
    def from_json(cls, value: Any) -> UdpRequest:
        d = _obj(value, "udp request")
        size = _int(d, "datagram_size", "udp request", lo=MIN_DATAGRAM, hi=MAX_DATAGRAM,
                    default=DEFAULT_DATAGRAM)
        flow = Flow.from_json(d["flow"]) if d.get("flow") is not None else None
        version = _int(d, "version", "udp request", lo=1, hi=255, default=1)
        base = None
        if d.get("base_datagram_size") is not None:
            base = _int(d, "base_datagram_size", "udp request", lo=MIN_DATAGRAM, hi=size)
        return cls(size, _hex(d, "x25519", "udp request", 32), flow, version, base)


@dataclass(frozen=True, slots=True)
class UdpOffer:
    """``{connection_id, port, datagram_size, flow, key? | x25519?, version?}``: the path
    the daemon set up. ``connection_id`` is a 64-bit integer (hex string on the wire),
    ``key`` the 32-byte path secret (HTTPS only), ``x25519`` the daemon's public key,
    ``version`` the datagram format both ends speak (the lower of the request's and the
    daemon's; 1 when absent)."""

    connection_id: int
    port: int
    datagram_size: int
    flow: Flow
    key: bytes | None = None
    x25519: bytes | None = None
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connection_id": f"{self.connection_id:016x}", "port": self.port,
                               "datagram_size": self.datagram_size, "flow": self.flow.to_json()}
        if self.version != 1:
            out["version"] = self.version
        if self.key is not None:
            out["key"] = self.key.hex()
        if self.x25519 is not None:
            out["x25519"] = self.x25519.hex()
        return out

    @classmethod
    def from_json(cls, value: Any) -> UdpOffer:
        where = "udp answer"
        d = _obj(value, where)
        cid_text = _str(d, "connection_id", where, max_len=16)
        try:
            cid = int(cid_text, 16)
        except ValueError:
            raise ProtocolError(f"{where}: connection_id is not hex") from None
        port = _int(d, "port", where, lo=1, hi=65535)
        size = _int(d, "datagram_size", where, lo=MIN_DATAGRAM, hi=MAX_DATAGRAM)
        flow = Flow.from_json(d.get("flow", {}), f"{where} flow")
        key, pub = _hex(d, "key", where, 32), _hex(d, "x25519", where, 32)
        if (key is None) == (pub is None):
            raise ProtocolError(f"{where}: exactly one of key and x25519")
        version = _int(d, "version", where, lo=1, hi=MAX_VERSION, default=1)
        return cls(cid, port, size, flow, key, pub, version)


@dataclass(frozen=True, slots=True)
class UdpFigures:
    """``{retransmitted_bytes, sent_packets, loss_pct, rtt_ms, datagram_size}``: what the daemon's end of
    a session's UDP paths sent, in the answer to ``DELETE /session/{id}`` (key ``udp``)
    so that a downloading client, which only receives, can report the sender's figures
    (``--json``'s ``retransmitted_bytes``, ``loss_pct``, ``rtt_ms``)."""

    retransmitted_bytes: int
    sent_packets: int
    loss_pct: float
    rtt_ms: float
    datagram_size: int = 0  # bytes per DATA datagram at the end (0: not reported)

    def to_json(self) -> dict[str, Any]:
        return {"retransmitted_bytes": self.retransmitted_bytes,
                "sent_packets": self.sent_packets, "loss_pct": round(self.loss_pct, 4),
                "rtt_ms": round(self.rtt_ms, 3), "datagram_size": self.datagram_size}

    @classmethod
    def from_json(cls, value: Any) -> UdpFigures:
        where = "close answer udp"
        d = _obj(value, where)
        loss, rtt = d.get("loss_pct", 0.0), d.get("rtt_ms", 0.0)
        if not isinstance(loss, (int, float)) or not isinstance(rtt, (int, float)) \
                or not 0 <= loss <= 100 or not 0 <= rtt < 1e7:
            raise ProtocolError(f"{where}: loss_pct and rtt_ms must be numbers in range")
        return cls(_int(d, "retransmitted_bytes", where, default=0),
                   _int(d, "sent_packets", where, default=0), float(loss), float(rtt),
                   _int(d, "datagram_size", where, hi=MAX_DATAGRAM, default=0))

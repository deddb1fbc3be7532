"""Events a ``UdpConnection`` hands its owner, its statistics and its configuration.

Pieces travel in *batches* (``PiecesReceived``, ``PiecesAcked``, ``PiecesLost``): one
event per ``next_event`` call carries every piece since the previous call. A frozen
dataclass per piece costs about 0.7 us to build (a tuple 0.05 us; measured here with
Python 3.11), an eighth of the whole per-datagram budget of one side at 250 MB/s
(5.6 us), so the hot path builds plain tuples and the events carry lists of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transport.udp.codec import (
    DEFAULT_DATAGRAM,
    VERSION,
    VERSIONS,
    check_datagram_size,
    max_piece_payload,
)
from transport.udp.rate import RateConfig

#: ``(file, block, offset, data)`` of a received piece; ``data`` is valid until the owner
#: drops it (it views the decrypted datagram, no copy).
ReceivedPiece = tuple[int, int, int, memoryview]
#: ``(file, block, offset, length)`` of a piece that was sent (a hole piece's ``length``
#: is the bytes it stands for), or of a hole piece received.
PieceRef = tuple[int, int, int, int]
#: A socket address as the adapter gives it (``(host, port)`` or the IPv6 4-tuple).
Address = tuple[Any, ...]

#: CLOSE codes.
CLOSE_DONE = 0
CLOSE_ABORTED = 1
CLOSE_PN_EXHAUSTED = 2
CLOSE_IDLE = 3
CLOSE_FAILED = 4
"""The sender of the CLOSE failed for good (its disk full or read-only, a refused
file): a new connection would meet the same error. A peer that does not know the code
takes it as ``CLOSE_ABORTED``."""


@dataclass(frozen=True, slots=True)
class UdpConfig:
    """Per-connection options.

    ``datagram_size``: UDP payload bytes (Aspera's ``-Z``); 1452 fits a 1,500-byte MTU
    under IPv6 (40) and UDP (8) headers, so IPv4 too. ``max_queue_bytes``: bound of the
    piece bytes queued but not yet sent (the owner reads ahead at most that much).
    Feedback goes back after ``ack_every`` DATA datagrams or ``max_ack_delay`` seconds
    after the first unreported one, whichever comes first, and at once for KEEPALIVE.
    ``host_lag_allowance`` (s): how much of the time a datagram waited for the
    receiving process (kernel receive timestamp to processing) is left out of its
    one-way delay; waits beyond it count as queueing (a receiver that falls behind).
    25 ms covers a descheduled process on a busy host (CFS's default latency target is
    24 ms with 8+ runnable tasks) and is small next to the 1-3 s of datagrams a 32 MiB
    receive buffer holds at 100-300 MB/s.
    ``receive_cap`` (bits/s of DATA datagram bytes, None: none): what this end accepts
    from its peer (``rate.RatePolicer``); beyond ``receive_cap * (1 + receive_cap_margin)``
    after a burst of ``receive_cap_burst`` seconds of it, DATA datagrams are dropped
    unacknowledged (``drops["policed"]``). A daemon sets it from the server's flow cap on
    an upload, so a client that ignores the flow it was answered gets no more than that.

    ``initial_datagram_size`` (None: ``datagram_size`` from the start, as when a user
    sets ascp's ``-Z``): when smaller than ``datagram_size``, the connection sends
    datagrams of this size (the base, RFC 8899 section 5.1.2's BASE_PLPMTU) until the
    peer answers a PROBE padded to ``datagram_size`` (the largest size the route's MTU
    allows, RFC 8899 section 5.1.4's MAX_PLPMTU), then ``datagram_size``: path MTU
    discovery of one step (``MtuRaised``). ``pmtu_probes`` tries, spaced
    ``max(3 RTT, pmtu_probe_spacing)`` s, then the base stays (RFC 8899 MAX_PROBES = 3).
    The receiving side accepts any size up to the 64 KiB datagram limit either way.

    ``version``: the datagram format version this connection speaks, agreed over the
    control channel (1, or 2 with hole pieces: ``queue_hole``); datagrams of another
    version are dropped (``drops["magic"]``).
    """

    datagram_size: int = DEFAULT_DATAGRAM
    initial_datagram_size: int | None = None
    pmtu_probes: int = 3
    pmtu_probe_spacing: float = 0.2
    rate: RateConfig = field(default_factory=RateConfig)
    max_queue_bytes: int = 4 << 20
    ack_every: int = 64
    max_ack_delay: float = 0.004
    silent_after: float = 3.0
    keepalive_interval: float = 1.0
    replay_window: int = 4096
    burst_time: float = 0.002
    max_tracked_ranges: int = 8192
    host_lag_allowance: float = 0.025
    receive_cap: float | None = None
    receive_cap_margin: float = 0.10
    receive_cap_burst: float = 0.100
    version: int = VERSION

    def __post_init__(self) -> None:
        check_datagram_size(self.datagram_size)
        if self.initial_datagram_size is not None:
            check_datagram_size(self.initial_datagram_size)
            if self.initial_datagram_size > self.datagram_size:
                raise ValueError("initial_datagram_size larger than datagram_size")
        if self.version not in VERSIONS:
            raise ValueError(f"datagram format version {self.version} not in {VERSIONS}")
        if self.max_queue_bytes < max_piece_payload(self.datagram_size):
            raise ValueError("max_queue_bytes smaller than one datagram")
        if self.ack_every < 1 or self.max_ack_delay <= 0 or self.silent_after <= 0:
            raise ValueError("ack_every, max_ack_delay and silent_after must be positive")
        if self.receive_cap is not None and (self.receive_cap <= 0 or self.receive_cap_margin < 0
                                             or self.receive_cap_burst <= 0):
            raise ValueError("receive_cap, its margin and burst must be positive")
        if not 0 <= self.host_lag_allowance <= 1.0:
            raise ValueError("host_lag_allowance: 0 to 1 s")
        if self.replay_window < 64 or self.replay_window & (self.replay_window - 1):
            raise ValueError("replay_window: a power of two, at least 64 packets")


@dataclass(frozen=True, slots=True)
class PiecesReceived:
    """Pieces received since the last event, in arrival order; ``holes``: the hole pieces
    (version 2) among them, ``(file, block, offset, length)``, each after the data pieces
    of its own datagram (a block's digest piece travels with its hole piece)."""

    pieces: list[ReceivedPiece]
    holes: list[PieceRef] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PiecesAcked:
    """The receiver acknowledged these pieces: delivered."""

    pieces: list[PieceRef]


@dataclass(frozen=True, slots=True)
class PiecesLost:
    """Not (known to be) delivered: lost, or abandoned at close. The owner re-leases them."""

    pieces: list[PieceRef]


@dataclass(frozen=True, slots=True)
class SendReady:
    """The send queue fell to half its bound: ``budget`` bytes may be queued."""

    budget: int


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    token: int
    rtt: float       # seconds
    size: int        # bytes of the probe datagram that crossed the path


@dataclass(frozen=True, slots=True)
class MtuRaised:
    """The peer answered a PROBE of ``size`` bytes: DATA goes out in datagrams of
    ``size`` bytes from now on (``UdpConfig.initial_datagram_size``)."""

    size: int        # bytes of UDP payload per datagram
    previous: int


@dataclass(frozen=True, slots=True)
class PathSilent:
    """Nothing authenticated heard from the peer since ``since`` (seconds, owner's clock)."""

    since: float


@dataclass(frozen=True, slots=True)
class PathResumed:
    silent_for: float


@dataclass(frozen=True, slots=True)
class Closed:
    code: int
    reason: str
    error: bool
    by_peer: bool


Event = (PiecesReceived | PiecesAcked | PiecesLost | SendReady | ProbeAnswered | MtuRaised
         | PathSilent | PathResumed | Closed)


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot. Bytes count datagram payloads unless named ``piece``; rates in bits/s."""

    rtt_ms: float
    min_rtt_ms: float
    queue_delay_ms: float
    loss_pct: float               # packets declared lost / ack-eliciting packets resolved
    rate: float                   # pacing rate
    delivery_rate: float          # receiver's receive rate as last reported
    sent_bytes: int
    sent_packets: int
    sent_piece_bytes: int
    retransmitted_bytes: int      # piece bytes queued by the owner as retransmissions
    lost_bytes: int
    spurious_losses: int
    received_bytes: int
    received_packets: int
    received_piece_bytes: int
    bytes_in_flight: int
    queued_bytes: int
    controller: str
    controller_state: str
    packet_threshold: int
    time_threshold: float
    drops: dict[str, int]
    datagram_size: int = DEFAULT_DATAGRAM  # the size DATA datagrams are sent at now
    sent_hole_pieces: int = 0     # hole pieces sent, retransmissions included (version 2)
    sent_hole_bytes: int = 0      # bytes those hole pieces stood for (not on the wire)
    received_hole_pieces: int = 0

"""The vocabulary of the sender's scheduler (``transport.blocks.scheduler``): leases,
the states a leased byte range moves through, and the records the scheduler keeps.

A ``Lease`` is bytes ``[offset, offset + length)`` of one block given to one path. Its
bytes are in one ``State`` at a time; an ``Event`` (the path took, delivered or lost
them, the receiver acknowledged or refused them, the deadline passed, the path died)
moves them by the table ``TRANSITIONS``, which the scheduler applies and nothing else
may bypass. ``PathTiming`` gives a path's deadlines (from an RTT estimate as QUIC's
probe timeout, RFC 9002 section 6.2.1). ``_Rec`` (a live lease, aioquic's sent-packet
map entry) and ``_Block`` (a started, unacknowledged block) are the scheduler's own
records, kept here beside the states they carry.

Time is in seconds (any monotonic origin); sizes are stored bytes. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from transport.blocks.ranges import RangeSet

__all__ = [
    "DEFAULT_TIMING", "K_GRANULARITY", "Event", "Lease", "PathTiming", "SchedulerStats", "State",
    "TRANSITIONS",
]

K_GRANULARITY = 0.001
"""Timer granularity in seconds (RFC 9002 section 6.1.2, kGranularity)."""


class State(Enum):
    """Where a byte range of a wanted block is (see ``TRANSITIONS``)."""

    QUEUED = "queued"
    LEASED = "leased"
    DELIVERED = "delivered"
    RECEIVED = "received"
    ACKED = "acked"


class Event(Enum):
    """What moves a byte range from one ``State`` to the next."""

    LEASE = "lease"  # a path took the bytes
    DELIVER = "deliver"  # the path put them on the wire
    RECEIVE = "receive"  # the receiver acknowledged the bytes (piece-level)
    EXPIRE = "expire"  # the lease's deadline passed
    LOSE = "lose"  # the path declared them lost
    NACK = "nack"  # the receiver reported them missing (refused, failed block)
    DROP_PATH = "drop_path"  # the path died
    ACK = "ack"  # the receiver journaled the whole block


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.QUEUED, Event.LEASE): State.LEASED,
    (State.LEASED, Event.DELIVER): State.DELIVERED,
    (State.LEASED, Event.RECEIVE): State.RECEIVED,  # acked before the path reported it sent
    (State.DELIVERED, Event.RECEIVE): State.RECEIVED,
    (State.LEASED, Event.EXPIRE): State.QUEUED,
    (State.DELIVERED, Event.EXPIRE): State.QUEUED,
    (State.LEASED, Event.LOSE): State.QUEUED,
    (State.DELIVERED, Event.LOSE): State.QUEUED,
    (State.LEASED, Event.DROP_PATH): State.QUEUED,
    (State.DELIVERED, Event.DROP_PATH): State.QUEUED,
    (State.LEASED, Event.NACK): State.QUEUED,
    (State.DELIVERED, Event.NACK): State.QUEUED,
    (State.RECEIVED, Event.NACK): State.QUEUED,
    (State.QUEUED, Event.ACK): State.ACKED,
    (State.LEASED, Event.ACK): State.ACKED,
    (State.DELIVERED, Event.ACK): State.ACKED,
    (State.RECEIVED, Event.ACK): State.ACKED,
}
"""Every allowed move of a byte range; anything else (a second ``delivered``,
any event after ``ACKED``) is ignored and counted as stale."""


@dataclass(frozen=True, slots=True)
class PathTiming:
    """Deadlines of one path's leases, in seconds.

    ``lease_timeout``: from ``lease`` to ``delivered`` (the path holds the
    bytes before sending them: size it from the path's rate and queue).
    ``ack_timeout``: from ``delivered`` to the receiver's ack (piece-level on
    a datagram path, block-level on a stream path, where it must also cover
    the receiver's journal flush).
    """

    lease_timeout: float
    ack_timeout: float
    reliable: bool = False
    """Delivered bytes reach the receiver unless the path dies (a TCP stream). A
    whole block delivered on such a path stops holding the block open (the
    receiver checks it on arrival, it is never half-assembled there); any other
    delivered piece holds its block open until piece-acked or acked, so the
    sender never has more half-received blocks at the receiver than
    ``max_open_blocks``."""

    def __post_init__(self) -> None:
        if not (self.lease_timeout > 0 and self.ack_timeout > 0):
            raise ValueError("timeouts must be positive")

    @classmethod
    def from_rtt(cls, srtt: float, rttvar: float, *, max_ack_delay: float = 0.025,
                 hold: float = 1.0, reliable: bool = False) -> PathTiming:
        """Deadlines from an RTT estimate: ``ack_timeout`` is QUIC's probe timeout,
        ``srtt + max(4 * rttvar, kGranularity) + max_ack_delay`` (RFC 9002 section
        6.2.1); ``lease_timeout`` is ``hold`` plus that (seconds a lease may wait to be sent)."""
        pto = srtt + max(4 * rttvar, K_GRANULARITY) + max_ack_delay
        return cls(lease_timeout=hold + pto, ack_timeout=pto, reliable=reliable)


DEFAULT_TIMING = PathTiming(lease_timeout=10.0, ack_timeout=10.0)


@dataclass(frozen=True, slots=True)
class Lease:
    """Bytes ``[offset, offset + length)`` of a block's stored form, given to ``path``."""

    id: int
    path: str
    file: int
    block: int
    offset: int
    length: int

    @property
    def stop(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counters of one scheduler (bytes are stored bytes)."""

    outstanding: int  # wanted blocks not acked
    open_blocks: int  # blocks with bytes queued or leased
    live_leases: int
    leased_bytes: int  # total ever leased (re-leases included)
    requeued_bytes: int  # bytes put back after expiry, loss, nack or a dead path
    expired: int  # leases whose deadline passed
    lost: int  # leases declared lost by their path
    acked: int  # blocks acked
    block_timeouts: int  # fully received blocks sent again for want of an ack
    stale: int  # calls about leases or blocks already retired (ignored)


class _Rec:
    """A live lease (the sent-packet map entry)."""

    __slots__ = ("deadline", "holds", "lease", "state")

    def __init__(self, lease: Lease, deadline: float) -> None:
        self.lease = lease
        self.state = State.LEASED
        self.deadline = deadline
        self.holds = True  # keeps its block open (see PathTiming.reliable)


class _Block:
    """A started, unacknowledged block."""

    __slots__ = ("file", "holding", "index", "leases", "length", "ready", "received", "timer",
                 "todo", "undelivered")

    def __init__(self, file: int, index: int, length: int) -> None:
        self.file = file
        self.index = index
        self.length = length
        self.todo = RangeSet([(0, length)])
        self.received = RangeSet()
        self.leases: dict[int, _Rec] = {}
        self.undelivered = 0  # live leases in State.LEASED
        self.holding = 0  # live leases holding the block open
        self.ready = False  # in Scheduler._ready
        self.timer: float | None = None  # block-ack safety deadline

    @property
    def open(self) -> bool:
        """Bytes queued, leased, or delivered on a datagram path and not acked yet:
        the receiver may be holding it half-assembled."""
        return bool(self.todo) or self.holding > 0

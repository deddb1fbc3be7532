"""Paths: the I/O shells that carry a session's blocks, behind one small interface.

A **path** moves blocks of one session between the client and the daemon in
one direction: an HTTP(S) stream (``HttpPath``, one chunked request at a
time) or the UDP path (``fallback.client.udppath.UdpPath`` on ``transport/udp``). The engine and the path manager
(``fallback.client.manager``) know only this interface (``docs/blocks.md``,
"The path interface"):

* ``open()``: connect, authenticate, agree on the session (HTTP: nothing, a
  stream is one request on the session's keep-alive connection pool);
* ``run()``: move blocks until there is nothing for this path to do, and say
  how it ended as a **signal** (below); raises only errors that end the whole
  transfer (a refusal, an integrity failure, a protocol error);
* ``probe()``: a cheap check that the path works (alive, round-trip time);
* ``stats()``: bytes, blocks, last activity, whether it holds work now;
* ``close(error)``: release what ``open`` took.

Signals are typed, so the manager can react to each kind: ``PathDone`` (out
of work), ``ConnectFailed`` (no connection could be made: the daemon is down
or unreachable), ``Throttled`` (the daemon said 429/503: too many streams,
shutting down, busy), ``PathLost`` (a working connection broke), ``Stalled``
(no bytes for too long while holding work: raised by the manager's watchdog).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from transport.errors import ConnectError, ConnectionLost, RemoteError, TransportError

THROTTLE_STATUSES = (429, 503)
"""Statuses that mean "not now" rather than "no": ``streams_max`` reached, too
many sessions, the daemon shutting down or out of descriptors (docs/protocol.md)."""


# -- signals ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PathDone:
    """The path ran out of work (its stream ended cleanly)."""

    path: str


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """No connection could be made (refused, unreachable, connect timeout)."""

    path: str
    error: TransportError


@dataclass(frozen=True, slots=True)
class Throttled:
    """The daemon refused for now (429, 503); ``retry_after`` seconds when it said."""

    path: str
    error: TransportError
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class PathLost:
    """A working connection broke mid-stream; what it held must be sent again."""

    path: str
    error: TransportError


@dataclass(frozen=True, slots=True)
class Stalled:
    """No byte moved for ``idle`` seconds while the path held work (the watchdog's verdict)."""

    path: str
    idle: float

    @property
    def error(self) -> TransportError:
        return ConnectionLost(f"{self.path}: no data moved for {self.idle:.0f} s")


PathFailure = ConnectFailed | Throttled | PathLost | Stalled
PathSignal = PathDone | PathFailure


def classify(path: str, exc: TransportError) -> PathFailure | None:
    """The signal for a stream's error, or None when the error ends the transfer."""
    if isinstance(exc, ConnectError):
        return ConnectFailed(path, exc)
    if isinstance(exc, ConnectionLost):
        return PathLost(path, exc)
    if isinstance(exc, RemoteError) and exc.peer_status in THROTTLE_STATUSES:
        return Throttled(path, exc, exc.retry_after)
    return None


# -- what a path reports --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PathStats:
    """A path's counters; ``last_activity`` is ``time.monotonic()`` of its last block."""

    id: str
    kind: str  # "http" | "https" | "udp"
    bytes: int  # bytes of blocks moved (sent or received), this path's lifetime
    blocks: int
    runs: int  # how many times ``run`` was called
    last_activity: float
    busy: bool  # it holds work now (a block taken, a request waiting for data)
    rtt: float | None = None  # seconds, from the last probe


@dataclass(frozen=True, slots=True)
class PathProbe:
    """What ``probe`` found: alive or not, the round trip in seconds, the error if any."""

    alive: bool
    rtt: float | None = None
    error: str | None = None


class Path(Protocol):
    """One way of carrying a session's blocks (see the module docstring)."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    async def open(self) -> None: ...

    async def run(self) -> PathSignal: ...

    async def probe(self) -> PathProbe: ...

    def stats(self) -> PathStats: ...

    async def close(self, error: str | None = None) -> None: ...


# -- HTTP(S) ------------------------------------------------------------------------------------------
Stream = Callable[[str, Callable[[int], None]], Awaitable[object]]
"""Runs one HTTP stream of the given path id to its end, calling the given function
with the bytes of each piece moved (``transport.http.client.upload_stream`` /
``download_stream`` bound to their session)."""
Probe = Callable[[], Awaitable[object]]


class HttpPath:
    """One HTTP(S) stream of a session: a PUT (upload) or GET (download) of block frames.

    ``stream`` runs one request to its end; the path turns how it ended into a
    signal. The session's connection pool (``fallback.remote.Remote``) is
    shared by all its streams and its control calls, so ``open`` and ``close``
    have nothing to do for HTTP; a path may ``run`` again after a failure.
    """

    def __init__(self, id: str, kind: str, stream: Stream, probe: Probe | None = None) -> None:
        self._id = id
        self._kind = kind
        self._stream = stream
        self._probe = probe
        self._bytes = 0
        self._blocks = 0
        self._runs = 0
        self._busy = False
        self._last = time.monotonic()
        self._rtt: float | None = None

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self._kind

    async def open(self) -> None:
        self._last = time.monotonic()

    def _moved(self, n: int) -> None:
        self._bytes += n
        self._blocks += 1
        self._last = time.monotonic()

    async def run(self) -> PathSignal:
        self._runs += 1
        self._busy = True
        self._last = time.monotonic()
        try:
            await self._stream(self._id, self._moved)
        except TransportError as exc:
            signal = classify(self._id, exc)
            if signal is None:
                raise
            return signal
        finally:
            self._busy = False
        return PathDone(self._id)

    async def probe(self) -> PathProbe:
        if self._probe is None:
            return PathProbe(alive=True)
        t0 = time.monotonic()
        try:
            await self._probe()
        except TransportError as exc:
            return PathProbe(alive=False, error=exc.message)
        self._rtt = time.monotonic() - t0
        return PathProbe(alive=True, rtt=self._rtt)

    def stats(self) -> PathStats:
        return PathStats(self._id, self._kind, self._bytes, self._blocks, self._runs,
                         self._last, self._busy, self._rtt)

    async def close(self, error: str | None = None) -> None:
        self._busy = False

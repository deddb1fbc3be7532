"""Client retries: when every path is down, re-connect and re-open for a bounded time.

The path manager (``fallback.client.manager``) retries each path on its own
while the session lives. When every path stays down (the daemon died, its
ports are blocked, the network is cut), the manager gives up and the transfer
**retries as a whole**: it re-connects (``fallback.remote.Router`` may pick the
daemon's other scheme), re-opens a session and resumes through the normal plan
(the daemon keeps partials and journals across restarts; a download keeps its
own). Between attempts it backs off with full jitter (``manager.Backoff``; AWS,
Brooker 2015).

Only a transfer that got under way (an attempt opened a session) retries: a
daemon that cannot be reached at all at the start (a wrong host or port, a
firewall) fails at once, after the other scheme was tried.

Bounds (``--retries N``, ``--retry-timeout SECONDS``): an **outage** starts
when every path was first seen down (or when a control call could not reach
the daemon); retrying stops after ``retries`` re-connections or ``timeout``
seconds into the outage, whichever comes first. An attempt that moved data
ends the outage: the next one starts both counts afresh.

Retried: errors saying the daemon could not be reached or the connection
broke (``ConnectionLost``, ``ConnectError``), and a session the daemon no
longer knows (it was restarted: ``404 unknown or expired session``). Never
retried: refusals (401, 403, 407...), a target another transfer is writing
(409: the re-connection first ends this transfer's own cut-off session over
the new route, ``Remote.end_earlier``, so a 409 is someone else's), integrity
and protocol errors, and a certificate that is not trusted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from fallback.client.manager import Backoff
from fallback.errors import UdpUnavailable
from fallback.known_hosts import CertificateChanged, CertificateNotTrusted
from transport.errors import ConnectionLost, ErrorKind, RemoteError, TransportError

SESSION_GONE = "unknown or expired session"
"""The daemon's error text for a session id it does not know (``fallback.sessions``),
answered with 404: after a restart, every call of an old session gets it."""
BACKOFF = Backoff(base=0.5, cap=5.0)
"""Seconds between re-connections: ``uniform(0, min(5, 0.5 * 2**attempt))``."""


def retryable(exc: TransportError) -> bool:
    """True for errors that a new connection and session may get past (module docstring)."""
    if isinstance(exc, UdpUnavailable):  # --transport udp without a UDP path: no retry helps
        return False
    if isinstance(exc, CertificateNotTrusted | CertificateChanged) or exc.kind is ErrorKind.UNTRUSTED:
        return False
    if isinstance(exc, ConnectionLost):
        return True
    return isinstance(exc, RemoteError) and exc.peer_status == 404 and SESSION_GONE in exc.message


class Retry:
    """The retry budget of one transfer (``retries`` re-connections, ``timeout`` seconds
    per outage). ``clock`` and ``rand`` are injectable for tests."""

    def __init__(self, retries: int, timeout: float, backoff: Backoff = BACKOFF,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self._clock = clock
        self._rand = rand
        self.outage: float | None = None  # when the current outage began
        self.attempts = 0  # re-connections in the current outage

    def left(self) -> float:
        """Seconds of retrying left in the current outage (the whole timeout outside one)."""
        if self.outage is None:
            return self.timeout
        return self.outage + self.timeout - self._clock()

    def after(self, exc: TransportError, *, down_since: float | None, moved: bool) -> float | None:
        """An attempt failed with ``exc``: seconds to wait before the next, or None to give
        up. ``down_since``: when every path was first seen down (the manager's), if that is
        how it failed; ``moved``: the attempt moved data (the outage starts afresh)."""
        if not retryable(exc):
            return None
        now = self._clock()
        if moved or self.outage is None:
            self.outage = min(down_since, now) if down_since is not None else now
            self.attempts = 0
        left = self.outage + self.timeout - now
        if self.attempts >= self.retries or left <= 0:
            return None
        delay = min(left, self.backoff.delay(self.attempts, self._rand()))
        self.attempts += 1
        return delay

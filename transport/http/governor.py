"""The asyncio shell of a share controller: which of a session's streams send, how fast.

One ``StreamGovernor`` per session and direction, on the side that sends the
data (the daemon for downloads). Every stream ``join``s with its socket; before
each piece it asks ``admit(path)``; a stream not admitted leases nothing and
``wait``s. A sampler task reads ``TCP_INFO`` of the admitted streams every
``tick`` seconds, feeds the controller (``transport.blocks.share``), and
applies its decisions: the number of admitted streams, and for a finite rate
each admitted socket's ``SO_MAX_PACING_RATE`` (the rate split evenly).

Who waits: when the count shrinks, the streams admitted last wait at their
next piece; when it grows, those waiting longest go first. A stream that has
waited ``max_park`` seconds takes the place of the one admitted longest (at
that one's next piece), so no stream sits silent long enough for its client to
take it for stalled (``fallback.client.manager.STALL_TIMEOUT``, 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from transport.blocks.share import ShareController, TcpSample
from transport.http.tcpinfo import SockLike, read_tcp_info, set_max_pacing_rate

log = logging.getLogger("transport.http")

TICK = 0.1
"""Seconds between samples: a few per RTT on WAN paths, cheap (one getsockopt per stream)."""
MAX_PARK = 20.0
"""Seconds a stream waits at most before it takes a turn (a third of the client's stall timeout)."""


class StreamGovernor:
    """Admits a session's streams by its ``controller`` (see the module docstring)."""

    def __init__(self, controller: ShareController, *, tick: float = TICK,
                 max_park: float = MAX_PARK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.controller = controller
        self.tick = tick
        self.max_park = max_park
        self._clock = clock
        self._socks: dict[str, SockLike | None] = {}
        self._active: dict[str, float] = {}  # path -> admitted at, oldest first
        self._waiting: dict[str, float] = {}  # path -> waiting since, oldest first
        self._paced: dict[str, float] = {}  # path -> pacing rate last set
        self._rate = controller.rate_bps
        self._changed = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.admitted_max = 0  # most streams admitted at once (for tests and logs)

    # -- streams --------------------------------------------------------------------------
    def join(self, path: str, sock: SockLike | None) -> None:
        """A stream starts; ``sock`` is its socket (None: counted, never sampled)."""
        self._socks[path] = sock
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.ensure_future(self._sample_loop())

    def leave(self, path: str) -> None:
        """A stream ended (any way): its place goes to a waiting one."""
        self._socks.pop(path, None)
        self._active.pop(path, None)
        self._waiting.pop(path, None)
        self._paced.pop(path, None)
        self.controller.forget(path)
        self._notify()
        if not self._socks and self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    def admit(self, path: str) -> bool:
        """May ``path`` send its next piece now? False: it waits (``wait``) and leases nothing."""
        now = self._clock()
        allowed = max(1, self.controller.streams)
        if path in self._active:
            order = list(self._active)
            if order.index(path) >= allowed:  # the count shrank: the newest ones wait
                self._park(path, now)
                return False
            oldest_wait = next(iter(self._waiting.values()), None)
            if oldest_wait is not None and now - oldest_wait >= self.max_park \
                    and order[0] == path and now - self._active[path] >= self.max_park:
                self._park(path, now)  # a turn for the one that waited longest
                return False
            return True
        self._waiting.setdefault(path, now)
        free = allowed - len(self._active)
        if free > 0 and path in list(self._waiting)[:free]:
            del self._waiting[path]
            self._active[path] = now
            self.admitted_max = max(self.admitted_max, len(self._active))
            return True
        return False

    async def wait(self, path: str, timeout: float) -> None:
        """Until the admitted set or the count changes, or ``timeout`` seconds."""
        self._waiting.setdefault(path, self._clock())
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _park(self, path: str, now: float) -> None:
        self.controller.forget(path)  # counters start afresh when it sends again
        del self._active[path]
        self._waiting[path] = now
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- sampling -------------------------------------------------------------------------
    def sample_once(self, now: float) -> None:
        """Read the admitted streams' sockets, feed the controller, apply its decisions."""
        samples: dict[str, TcpSample] = {}
        for path in self._active:
            info = read_tcp_info(self._socks.get(path))
            # A socket that heard no ACK for a while says nothing about the queue now.
            if info is not None and info.rtt > 0 and info.last_ack_recv <= max(1.0, 4 * info.rtt):
                samples[path] = info.sample()
        streams = self.controller.streams
        self.controller.set_max_streams(len(self._socks))
        if samples:
            self.controller.on_tick(now, samples)
        rate = self.controller.rate_bps
        if self.controller.streams != streams \
                or (self.controller.name == "fair" and (rate == math.inf) != (self._rate == math.inf)):
            c = self.controller
            log.info("%s: %d of %d streams send, %s (queueing delay %.1f ms, base RTT %.1f "
                     "ms, capacity %.1f Mbit/s)", c.name, c.streams, c.max_streams,
                     "unpaced" if rate == math.inf else f"paced at {rate / 1e6:.1f} Mbit/s",
                     (c.queue_delay or 0) * 1e3, (c.base_rtt or 0) * 1e3, c.capacity_bps / 1e6)
            self._notify()
        self._rate = rate
        if rate == math.inf and not self._paced:
            return
        share = rate / max(1, len(self._active))
        for path in self._active:
            old = self._paced.get(path)
            if old is None or abs(old - share) > 0.01 * share:
                if set_max_pacing_rate(self._socks.get(path), share):
                    self._paced[path] = share

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.sample_once(self._clock())

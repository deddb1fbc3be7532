"""Failover between the UDP path and the HTTP(S) streams of one session (issue 13).

``--transport auto`` starts the session's HTTP(S) streams at once and probes the
daemon's UDP port beside them: the first data byte never waits for the probe.
When the probe is answered (within ``probe_budget`` seconds in all, a few
PROBEs), the HTTP(S) streams are stopped and the UDP path carries the rest;
when it is not, the reason is kept (``udp_reason`` in the result: ``timeout``,
``unreachable``, ``refused by server config``, or a proxy, which is not probed).

On UDP, ``UdpHealth`` (sans-IO: fed ``HealthSample``s, no clock of its own)
watches the path and says when to leave it:

* **lost**: nothing authenticated heard for ``lost_after`` seconds (2: the
  daemon's end sends at least a keepalive a second, so two were missed) while the
  path had work; the stall at the switch is this plus about 0.3 s;
* **degraded**: over the last ``window`` seconds, at least ``max_loss`` of the
  datagrams from the daemon lost (gaps in their packet numbers: its data on a
  download, its acknowledgements on an upload; the sender's own loss count is
  not used, as fast loss detection on a short RTT declares packets lost that
  arrive), or a goodput under ``min_ratio`` of what the HTTP(S) streams gave earlier in
  this session (a firewall policing UDP to a trickle after the handshake).

Leaving UDP: the UDP path is closed (its leases go back to the scheduler:
whatever was in flight is sent again, verified blocks never are), the daemon is
told (``DELETE .../udp``: its UDP leases go back to its scheduler too), and the
HTTP(S) streams take the remaining pieces. While on HTTP(S) a new UDP path is
probed again and again, ``reprobe_base`` seconds doubling to ``reprobe_cap``;
when it answers ``hold`` probes in a row it takes over again.

Every move goes through ``TransferSession.use_transport``, so ``transports``
reads e.g. ``["https", "udp", "https", "udp"]`` and each move is a ``switch``.
``--transport udp`` does not come here (UDP only); ``stay`` (``--no-fallback``
with ``auto``) never leaves UDP once on it: a lost UDP path fails the transfer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fallback.client.manager import Work
from fallback.client.paths import Path
from transport.errors import ConnectionLost, ErrorKind, TransportError

if TYPE_CHECKING:
    from fallback.client.session import TransferSession
    from fallback.client.udppath import UdpPath

log = logging.getLogger("fallback.client")

WATCH_TICK = 0.1
"""Seconds between two looks at the UDP path's health."""
SILENT_GUARD = 0.5
"""Seconds of silence after which loss is no longer judged (the path may be cut: that is
for ``lost_after`` to say; a policed path still lets a report through far more often)."""


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """When to leave UDP and when to come back (seconds, fractions)."""

    probe_budget: float = 1.5     # the first probe, PROBEs included, in all
    probes: int = 3               # PROBEs within that budget
    lost_after: float = 2.0       # silence that means the UDP path is lost (2 keepalives)
    window: float = 2.0           # the span degradation is judged over
    max_loss: float = 0.5         # datagrams lost over the window: degraded
    min_ratio: float = 0.2        # goodput against HTTP(S)'s: degraded below
    min_packets: int = 40         # datagrams in a window before loss is judged
    grace: float = 3.0            # seconds on UDP before goodput is judged
    reprobe_base: float = 1.0     # first re-probe after leaving UDP
    reprobe_cap: float = 8.0      # longest wait between re-probes
    hold: int = 3                 # probes answered in a row before coming back
    stay: bool = False            # never leave UDP once on it (--no-fallback)

    def __post_init__(self) -> None:
        if not (self.probe_budget > 0 and self.probes >= 1 and self.lost_after > 0
                and self.window > 0 and 0 < self.max_loss <= 1 and self.min_ratio >= 0
                and self.reprobe_base > 0 and self.reprobe_cap >= self.reprobe_base
                and self.hold >= 1):
            raise ValueError("bad failover settings")

    def reprobe_delay(self, attempt: int) -> float:
        return min(self.reprobe_cap, self.reprobe_base * (1 << min(attempt, 30)))


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One look at the UDP path: cumulative counters of its connection and pump."""

    now: float
    heard: float            # when the last authenticated datagram came
    busy: bool              # the path has work (pieces to send, or blocks missing)
    rx_packets: int = 0     # authenticated datagrams received (any type)
    rx_highest: int = -1    # the highest packet number received
    goodput: int = 0        # block bytes acknowledged (sending) or taken (receiving)


class UdpHealth:
    """Sans-IO verdicts on a UDP path (see the module docstring)."""

    def __init__(self, cfg: FailoverConfig, started: float, http_rate: float | None = None
                 ) -> None:
        self.cfg = cfg
        self.started = started
        self.http_rate = http_rate  # bytes/s the HTTP(S) streams gave, when measured
        self._window: deque[HealthSample] = deque()
        self.loss = 0.0             # the last window's loss fraction
        self.rate = 0.0             # the last window's goodput, bytes/s

    def observe(self, s: HealthSample) -> str | None:
        """A reason to leave UDP, or None while it is fine."""
        cfg = self.cfg
        if not s.busy:
            self._window.clear()  # idle is not silence, nor a low goodput
            return None
        if s.now - s.heard >= cfg.lost_after:
            return f"lost: nothing heard for {s.now - s.heard:.1f} s"
        w = self._window
        w.append(s)
        while len(w) > 1 and s.now - w[1].now >= cfg.window:
            w.popleft()
        first = w[0]
        span = s.now - first.now
        if span < cfg.window * 0.99 or s.now - s.heard >= min(SILENT_GUARD, cfg.lost_after / 2):
            return None  # a path going silent is judged lost, not degraded
        expected = s.rx_highest - first.rx_highest
        rx_loss = 1.0 - (s.rx_packets - first.rx_packets) / expected \
            if expected >= cfg.min_packets else 0.0
        self.loss = max(0.0, min(1.0, rx_loss))
        self.rate = (s.goodput - first.goodput) / span
        if self.loss >= cfg.max_loss:
            return f"degraded: {self.loss:.0%} of datagrams lost over {span:.1f} s"
        if self.http_rate and s.now - self.started >= cfg.grace \
                and self.rate < cfg.min_ratio * self.http_rate:
            return (f"degraded: {self.rate * 8 / 1e6:.2f} Mbit/s over {span:.1f} s, under "
                    f"{cfg.min_ratio:.0%} of HTTP's {self.http_rate * 8 / 1e6:.1f}")
        return None


def sample(udp: UdpPath, busy: bool) -> HealthSample:
    """The UDP path's counters now (``time.perf_counter``, the core's clock)."""
    pump = udp.pump
    now = time.perf_counter()
    if pump is None:
        return HealthSample(now, now, busy)
    conn = pump.conn
    return HealthSample(now, conn.last_heard, busy, conn.authenticated, conn.highest_received,
                        udp.stats().bytes)


class Failover:
    """The paths of one session under ``--transport auto`` (see the module docstring).

    ``run(work)`` replaces ``TransferSession.move`` for each phase; ``close``
    ends the probing and the UDP path (its figures into the result).
    """

    def __init__(self, session: TransferSession, http: Sequence[Path],
                 make_udp: Callable[[], UdpPath] | None, busy: Callable[[], bool],
                 cfg: FailoverConfig, why_not: str = "") -> None:
        from fallback.client.manager import PathManager

        self.session = session
        self.http = list(http)
        self.make_udp = make_udp
        self.busy = busy
        self.cfg = cfg
        self.udp: UdpPath | None = None
        self.mode = "http"
        self._probe: asyncio.Task[UdpPath | None] | None = None
        self._probe_reason = ""
        self.http_manager = session.new_manager(self.http)
        self._managers: list[PathManager] = []
        self._http_rate: float | None = None
        if why_not:
            session.result.udp_reason = why_not
        if make_udp is not None:
            self._probe = asyncio.ensure_future(self._first_probe())

    # -- phases -----------------------------------------------------------------------------
    async def run(self, work: Work) -> None:
        while not await (self._udp_phase(work) if self.mode == "udp" else self._http_phase(work)):
            pass

    async def _http_phase(self, work: Work) -> bool:
        """Run the HTTP(S) streams until the work is done (True) or a probed UDP path
        takes over (False)."""
        mgr = self.http_manager
        self.session.manager = mgr
        before = sum(p.stats().bytes for p in self.http)
        t0 = time.monotonic()
        run = asyncio.ensure_future(mgr.run(work))
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {run}
                if self._probe is not None:
                    waiting.add(self._probe)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if run.done():
                    run.result()
                    return True
                probe, self._probe = self._probe, None
                assert probe is not None
                udp = probe.result()
                if udp is not None:
                    break
        except BaseException:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            raise
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        spent = time.monotonic() - t0
        moved = sum(p.stats().bytes for p in self.http) - before
        if spent >= 1.0 and moved:
            self._http_rate = moved / spent
        for p in self.http:  # their pieces in flight are sent again over UDP
            work.lost(p.id)
            await p.close("moved to UDP")
        self.udp, self.mode = udp, "udp"
        self.session.result.udp_reason = ""
        self.session.use_transport("udp", self._probe_reason)
        return False

    async def _udp_phase(self, work: Work) -> bool:
        udp = self.udp
        assert udp is not None
        mgr = self.session.new_manager([udp])
        self.session.manager = mgr
        run = asyncio.ensure_future(mgr.run(work))
        watch = asyncio.ensure_future(self._watch(udp))
        try:
            await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (run, watch):
                if not t.done():
                    t.cancel()
            await asyncio.gather(run, watch, return_exceptions=True)
        reason: str | None = None
        if watch.done() and not watch.cancelled():
            reason = watch.result()
        elif run.done() and not run.cancelled():
            exc = run.exception()
            if exc is None:
                return True
            if not isinstance(exc, ConnectionLost):
                raise exc
            reason = f"lost: {exc.message}"
        if reason is None:
            return True
        if self.cfg.stay:  # not retryable either: a re-connection would go over HTTP(S)
            raise TransportError(f"UDP {reason} (--no-fallback: no fallback to HTTP(S))",
                                 kind=ErrorKind.UNAVAILABLE)
        await self._leave_udp(work, reason)
        return False

    async def _watch(self, udp: UdpPath) -> str:
        health = UdpHealth(self.cfg, time.perf_counter(), self._http_rate)
        while True:
            why = health.observe(sample(udp, self.busy()))
            if why is not None:
                return why
            await asyncio.sleep(WATCH_TICK)

    async def _leave_udp(self, work: Work, reason: str) -> None:
        udp = self.udp
        assert udp is not None
        self.udp, self.mode = None, "http"
        log.info("leaving UDP: %s", reason)
        await self._retire(udp, reason)
        work.lost(udp.id)
        self.session.result.udp_reason = reason
        self.session.use_transport(self.session.remote.scheme, f"UDP {reason}")
        if self.make_udp is not None and self._probe is None:
            self._probe = asyncio.ensure_future(self._reprobe())

    async def _retire(self, udp: UdpPath, reason: str) -> None:
        """Close a UDP path that will not be used (again): its figures into the result,
        its leases back, and the daemon told to give back its own (best effort)."""
        udp.report(self.session.result)
        await udp.close(reason)
        await self.session.control.close_udp()

    # -- probing ----------------------------------------------------------------------------
    async def _first_probe(self) -> UdpPath | None:
        assert self.make_udp is not None
        udp = self.make_udp()
        t0 = time.monotonic()
        try:
            await _open(udp)
        except TransportError as exc:
            await udp.close()
            self.session.result.udp_reason = exc.message.removeprefix("UDP: ")
            log.info("UDP not used: %s", self.session.result.udp_reason)
            if udp.refused_by_config:
                return None
            return await self._reprobe()  # meanwhile HTTP(S) carries the blocks
        self._probe_reason = f"UDP probe answered in {(time.monotonic() - t0) * 1e3:.0f} ms"
        return udp

    async def _reprobe(self) -> UdpPath | None:
        assert self.make_udp is not None
        attempt = 0
        while True:
            await asyncio.sleep(self.cfg.reprobe_delay(attempt))
            attempt += 1
            udp = self.make_udp()
            try:
                await _open(udp)
            except TransportError as exc:
                await udp.close()
                log.debug("UDP re-probe %d: %s", attempt, exc.message)
                if udp.refused_by_config:
                    return None
                continue
            held = 1
            try:
                while held < self.cfg.hold:
                    await asyncio.sleep(0.2)
                    if not (await udp.probe()).alive:
                        break
                    held += 1
            except BaseException:
                await udp.close()
                raise
            if held >= self.cfg.hold:
                self._probe_reason = f"UDP answers again ({held} probes in a row)"
                log.info("UDP re-probe %d: %s", attempt, self._probe_reason)
                return udp
            await self._retire(udp, "re-probe did not hold")

    async def close(self) -> None:
        """Stop probing; the UDP path's figures into the result; close it."""
        result = self.session.result
        if self._probe is not None and not self._probe.done() and self.mode == "http" \
                and not result.udp_reason and "udp" not in result.transports:
            result.udp_reason = "timeout: the UDP probe had no answer when the transfer ended"
        if self._probe is not None:
            self._probe.cancel()
            got = await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
            if got and got[0] is not None and not isinstance(got[0], BaseException):
                await got[0].close()
        if self.udp is not None:
            self.udp.report(self.session.result)
            await self.udp.close()
            self.udp = None


async def _open(udp: UdpPath) -> None:
    """``udp.open()``; cancelled meanwhile (the transfer ended), its socket is closed."""
    try:
        await udp.open()
    except asyncio.CancelledError:
        await udp.close()
        raise

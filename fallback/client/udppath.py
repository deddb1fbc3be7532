"""The client's UDP path: ``UdpPath`` implements the path interface on ``transport.udp``.

``open`` asks the daemon for a UDP path of the session (``POST .../udp``,
``fallback.udpcontrol``: over HTTPS the daemon returns the path secret, over plain
HTTP the two sides agree on it with X25519), binds a local UDP socket
(``transport.udp.aio.UdpEndpoint``) and sends a full-size PROBE: the path is up
when the PROBE_ACK comes back within ``probe_timeout`` seconds, else ``open``
raises ``ConnectError`` (the reason in one line). ``run`` moves blocks with a
``UdpPump`` (``fallback.udpblocks``) until there is nothing for it to do:

* upload: the session's ``BlockSender`` has nothing to lease and every piece the
  pump sent is acknowledged (the daemon has them; the commit says what is missing);
* download: every receiver is complete, or nothing arrived for ``IDLE_DONE``
  seconds (the download asks the daemon again for what it still misses).

It ends with ``PathLost`` when the daemon closed the path or went silent for
``SILENT_LOST`` seconds, and raises the pump's error when an authenticated peer
sent something the block layer refuses (or a source changed).

``open_udp`` is what the engine calls after the session opens for ``--transport
udp``: the UDP path or a ``ConnectError``. Under ``auto`` the failover
(``fallback.client.failover``) makes ``UdpPath``s itself, probing beside the HTTP(S)
streams: a path leases nothing before its PROBE is answered (``UdpPump.leasing``),
``probes`` PROBEs share ``probe_timeout``, and an ICMP port unreachable (the socket
has ``IP_RECVERR``) ends the probe at once as ``unreachable``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from fallback.client.paths import PathDone, PathLost, PathProbe, PathSignal, PathStats
from fallback.control import Flow
from fallback.errors import UdpUnavailable
from fallback.remote import Remote
from fallback.result import TransferResult
from fallback.udpblocks import UdpPump, udp_config
from fallback.udpcontrol import FEATURE, FEATURE_HOLES, MAX_VERSION, UdpOffer, UdpRequest
from transport.blocks.sender import BlockSender
from transport.blocks.sink import BlockSink
from transport.errors import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.udp import DEFAULT_PORT
from transport.udp.aio import UdpEndpoint
from transport.udp.codec import DEFAULT_DATAGRAM, MIN_DATAGRAM
from transport.udp.connection import UdpConnection
from transport.udp.crypto import X25519Exchange, derive_path_keys
from transport.udp.sockopt import route_max_datagram

log = logging.getLogger("fallback.client")

PROBE_TIMEOUT = 1.0
"""Seconds ``--transport auto`` waits for the UDP path's first PROBE to be answered."""
UDP_ONLY_PROBE_TIMEOUT = 5.0
"""The same for ``--transport udp`` (nothing else to fall back to, and no retry after it:
a little patience; a bench row on a loaded CI machine once went unanswered for 3 s)."""
UDP_ONLY_PROBES = 5
"""PROBEs ``--transport udp`` sends within ``UDP_ONLY_PROBE_TIMEOUT``, one a second until
one is answered: one PROBE alone is lost, or its answer, at 2 % loss each way one time
in 25, and the transfer then failed."""
IDLE_DONE = 1.0
"""Seconds without a piece after which a download's run ends (the engine asks again)."""
SILENT_LOST = 10.0
"""Seconds without an authenticated datagram after which the path is taken as lost."""
WAIT = 0.05


class UdpPath:
    """One UDP path of a session (the ``Path`` protocol, ``fallback.client.paths``)."""

    def __init__(self, remote: Remote, *, datagram_size: int | None, flow: Flow | None,
                 port: int | None,
                 sender: BlockSender | None = None, sink: BlockSink | None = None,
                 complete: Callable[[], bool] | None = None, block: int = 4 << 20,
                 probe_timeout: float = PROBE_TIMEOUT, probes: int = 1) -> None:
        self.remote = remote
        self.datagram_size = datagram_size
        self.flow = flow
        self.port = port
        self.sender = sender
        self.sink = sink
        self.complete = complete or (lambda: False)
        self.block = block
        self.probe_timeout = probe_timeout
        self.probes = max(1, probes)  # PROBEs sent, spaced, within probe_timeout in all
        self.refused_by_config = False  # the daemon offers no UDP path (not worth re-probing)
        self.pump: UdpPump | None = None
        self.endpoint: UdpEndpoint | None = None
        self.offer: UdpOffer | None = None
        self._runs = 0
        self._busy = False
        self._rtt: float | None = None
        self._moved = 0  # bytes and blocks of pumps closed before the current one
        self._blocks = 0
        self._last = time.monotonic()
        self._retx = 0
        self._loss = 0.0
        self._rtt_ms = 0.0
        self._size = 0

    @property
    def id(self) -> str:
        return "udp-0"

    @property
    def kind(self) -> str:
        return "udp"

    # -- open -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Set up the path (a no-op while it is up). ``ConnectError`` when the daemon
        refuses or its UDP port does not answer in time; ``ProtocolError`` for a
        malformed answer."""
        if self.pump is not None and not self.pump.conn.closed:
            return
        await self._drop_endpoint()
        remote = self.remote
        host = remote.url.host
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, self.port or DEFAULT_PORT,
                                           type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectError(f"UDP: cannot resolve {host}: {exc.strerror or exc}") from None
        family, _, _, _, addr = infos[0]
        size, base = self._sizes(family, addr)
        ex = X25519Exchange() if remote.scheme == "http" else None
        # Datagram format 2 (hole pieces) from a daemon that lists it, else 1.
        version = MAX_VERSION if FEATURE_HOLES in remote.features else 1
        req = UdpRequest(size, ex.public_bytes if ex is not None else None, self.flow,
                         version, base)
        try:
            raw = await remote.call("POST", remote.session_url("/udp"), req.to_json())
        except TransportError as exc:
            if isinstance(exc, RemoteError) and exc.peer_status in (403, 501):
                self.refused_by_config = True
                raise ConnectError(f"UDP: refused by server config: {exc.message}") from None
            raise ConnectError(f"UDP: the daemon refused a UDP path: {exc.message}") from None
        offer = UdpOffer.from_json(raw)
        if ex is not None:
            if offer.x25519 is None:
                raise ProtocolError("UDP: the daemon sent a key over plain HTTP, not X25519")
            try:
                secret = ex.path_secret(offer.x25519, remote.sid or "", initiator=True)
            except ValueError as exc:
                raise ProtocolError(f"UDP: {exc}") from None
        else:
            assert offer.key is not None
            secret = offer.key
        self.offer = offer
        port = self.port or offer.port
        addr = (addr[0], port, *addr[2:])
        try:
            endpoint = await UdpEndpoint.bind("::" if family == socket.AF_INET6 else "0.0.0.0",
                                              0)
        except OSError as exc:
            raise ConnectError(f"UDP: cannot reach {host}:{port}: {exc.strerror or exc}") from None
        self.endpoint = endpoint
        _report_icmp(endpoint, family)
        if offer.version > version:
            raise ProtocolError(f"UDP: the daemon answered datagram format {offer.version}, "
                                f"asked for {version}")
        base = base if base is not None and base < offer.datagram_size else None
        conn = UdpConnection(udp_config(offer.datagram_size, offer.flow, self.block, base=base,
                                        version=offer.version),
                             offer.connection_id, derive_path_keys(secret, initiator=True),
                             time.perf_counter(), peer=tuple(addr))
        # Nothing leased before the probe is answered: the HTTP(S) streams that started
        # beside it (--transport auto) take the blocks meanwhile.
        self.pump = UdpPump(conn, endpoint, self.id, sender=self.sender, sink=self.sink,
                            leasing=False)
        rtt = await self._probe_any(self.pump, self.probe_timeout, self.probes)
        if rtt is None:
            refused = endpoint.refused
            seen = _probe_counts(endpoint, conn)
            await self._drop_endpoint()
            if refused:
                raise ConnectError(f"UDP: unreachable: {host}:{port} answered ICMP port "
                                   "unreachable (nothing listens there)")
            if conn.authenticated:  # its answers to small datagrams came: the size is the matter
                raise ConnectError(f"UDP: timeout: {host}:{port} answered small datagrams but "
                                   f"no {conn.size}-byte probe within {self.probe_timeout:g} s: "
                                   "the path carries less (a tunnel or VPN with a smaller MTU "
                                   f"that drops larger packets); try -Z 1200 ({seen})")
            raise ConnectError(f"UDP: timeout: no answer from {host}:{port} within "
                               f"{self.probe_timeout:g} s (a firewall, or nothing on that port; "
                               f"{seen})")
        self._rtt = rtt
        log.info("UDP path to %s:%d up: connection %016x, %s-byte datagrams, rtt %.2f ms, "
                 "policy %s", host, port, offer.connection_id,
                 f"{base} (probing {offer.datagram_size})" if base else offer.datagram_size,
                 rtt * 1e3, offer.flow.policy)
        self.pump.leasing = True
        if self.sender is not None:
            self.pump.start_ticker()

    def _sizes(self, family: int, addr: tuple[Any, ...]) -> tuple[int, int | None]:
        """``(datagram size, base size or None)`` to ask the daemon for. A size the user
        set (``-Z``) is used from the start. Otherwise the largest datagram the route to
        the daemon carries unfragmented (``route_max_datagram``: 65,000 on loopback,
        8,972 on a 9,000-byte jumbo-frame LAN), reached from ``DEFAULT_DATAGRAM`` once
        a PROBE of that size crosses each direction (``UdpConfig.initial_datagram_size``);
        a path whose smaller MTU drops it stays at the default. A route whose MTU is
        below 1,500 bytes (a tunnel, a VPN) gets its own size from the start: no IP
        fragments. Per-datagram work is
        what a Python sender pays for, so larger datagrams where the path allows are the
        whole speed of a LAN or loopback transfer (839 MB/s at 65,000 B against 75 MB/s
        at 1,452 B on loopback, bench/README.md)."""
        if self.datagram_size is not None:
            return self.datagram_size, None
        top = route_max_datagram(family, addr)
        if top is None:
            return DEFAULT_DATAGRAM, None
        if top <= DEFAULT_DATAGRAM:  # a tunnel's smaller MTU: never fragment
            return max(top, MIN_DATAGRAM), None
        return top, DEFAULT_DATAGRAM

    @staticmethod
    async def _probe_any(pump: UdpPump, timeout: float, probes: int) -> float | None:
        """The round-trip time of the first of ``probes`` PROBEs (sent ``timeout /
        probes`` apart) to be answered within ``timeout``, or None: none answered, or an
        ICMP port unreachable came back first. An earlier PROBE's answer still counts
        after the next one went out: a single PROBE lost at 2 % loss each way failed one
        ``--transport udp`` bench row in 25, and a slow answer is no reason to wait
        for a later one."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + timeout
        tasks: list[asyncio.Task[float | None]] = []
        try:
            while True:
                now = loop.time()
                if len(tasks) < probes and now >= start + len(tasks) * timeout / probes:
                    tasks.append(asyncio.ensure_future(pump.probe(max(end - now, 0.0))))
                for t in tasks:
                    if t.done() and not t.cancelled() and t.result() is not None:
                        return t.result()
                if pump.endpoint.refused or now >= end or (
                        len(tasks) == probes and all(t.done() for t in tasks)):
                    return None
                await asyncio.wait(tasks, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # -- run ------------------------------------------------------------------------------
    async def run(self) -> PathSignal:
        pump = self.pump
        if pump is None:
            raise ConnectionLost("UDP path not open")
        self._runs += 1
        self._busy = True
        try:
            if self.sender is not None:
                pump.fill()
                pump.endpoint.wake()
            while True:
                if pump.error is not None:
                    raise pump.error
                if pump.closed is not None:
                    return PathLost(self.id, ConnectionLost(
                        f"UDP path closed: {pump.closed.reason or 'by the daemon'}"))
                if time.perf_counter() - pump.conn.last_heard > SILENT_LOST:
                    return PathLost(self.id, ConnectionLost(
                        f"UDP: nothing heard from the daemon for {SILENT_LOST:g} s"))
                if self.sender is not None:
                    if not self.sender.pending and pump.idle:
                        return PathDone(self.id)
                else:
                    if self.complete() and pump.idle:
                        return PathDone(self.id)
                    if pump.idle and time.monotonic() - pump.last_activity > IDLE_DONE:
                        return PathDone(self.id)
                pump.changed.clear()
                try:
                    await asyncio.wait_for(pump.changed.wait(), WAIT)
                except TimeoutError:
                    pass
        finally:
            self._busy = False

    async def probe(self) -> PathProbe:
        if self.pump is None:
            return PathProbe(alive=False, error="not open")
        rtt = await self.pump.probe(self.probe_timeout)
        if rtt is None:
            return PathProbe(alive=False, error="no answer")
        self._rtt = rtt
        return PathProbe(alive=True, rtt=rtt)

    def stats(self) -> PathStats:
        pump = self.pump
        moved = self._moved + (pump.moved if pump else 0)
        blocks = self._blocks + (pump.blocks if pump else 0)
        last = max(self._last, pump.last_activity if pump else 0.0)
        return PathStats(self.id, "udp", moved, blocks, self._runs, last, self._busy, self._rtt)

    def report(self, result: TransferResult) -> None:
        """The path's figures into the result (``retransmitted_bytes``, ``loss_pct``,
        ``rtt_ms``), from this client's end of the connection."""
        self._keep_stats()
        result.retransmitted_bytes += self._retx
        result.loss_pct = self._loss
        result.rtt_ms = self._rtt_ms or (self._rtt or 0.0) * 1e3
        result.datagram_size = self._size

    def _keep_stats(self) -> None:
        if self.pump is None:
            return
        st = self.pump.conn.stats()
        self._retx += st.retransmitted_bytes
        self._loss = st.loss_pct
        if st.rtt_ms:
            self._rtt_ms = st.rtt_ms
        self._size = st.datagram_size
        self._moved += self.pump.moved
        self._blocks += self.pump.blocks
        self._last = max(self._last, self.pump.last_activity)

    async def close(self, error: str | None = None) -> None:
        if self.pump is not None:
            self.pump.close(error or "", error=error is not None)
        await self._drop_endpoint()

    async def _drop_endpoint(self) -> None:
        if self.pump is not None:
            self._keep_stats()
            self.pump.close()
            await self.pump.drained()
            self.pump = None
        if self.endpoint is not None:
            await asyncio.sleep(0.01)  # the CLOSE leaves on the next wake
            self.endpoint.close()
            self.endpoint = None


def _report_icmp(endpoint: UdpEndpoint, family: int) -> None:
    """Ask the kernel to report ICMP errors (port unreachable) on the unconnected client
    socket (``IP_RECVERR``): the endpoint counts them (``refused``), and the probe ends
    at once with ``unreachable`` instead of waiting for its timeout."""
    try:
        if family == socket.AF_INET6:
            endpoint.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            endpoint.sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
    except OSError:
        pass  # not Linux: a probe to a closed port ends by its timeout


_IP_RECVERR = 11  # linux/in.h (not exported by Python's socket module)
_IPV6_RECVERR = 25  # linux/in6.h


async def open_udp(remote: Remote, transport: str, *, datagram_size: int | None,
                   flow: Flow | None,
                   port: int | None, sender: BlockSender | None = None,
                   sink: BlockSink | None = None, complete: Callable[[], bool] | None = None,
                   block: int = 4 << 20) -> UdpPath | None:
    """The UDP path the engine should use, opened, or None for HTTP(S) (see the module
    docstring). ``--transport udp`` raises ``ConnectError`` when the path cannot be had."""
    if transport not in ("udp", "auto"):
        return None
    if FEATURE not in remote.features:
        if transport == "udp":
            raise UdpUnavailable("UDP: refused by server config: the daemon offers no UDP path")
        log.info("transport %s: the daemon offers no UDP path", remote.scheme)
        return None
    path = UdpPath(remote, datagram_size=datagram_size, flow=flow, port=port, sender=sender,
                   sink=sink, complete=complete, block=block,
                   probe_timeout=UDP_ONLY_PROBE_TIMEOUT if transport == "udp" else PROBE_TIMEOUT,
                   probes=UDP_ONLY_PROBES if transport == "udp" else 1)
    try:
        await path.open()
    except TransportError as exc:
        await path.close()
        if transport == "udp":
            raise UdpUnavailable(exc.message, kind=exc.kind) from None
        log.info("transport %s: %s", remote.scheme, exc.message)
        return None
    log.info("transport udp: the daemon's UDP path answered")
    return path


def _probe_counts(endpoint: UdpEndpoint, conn: UdpConnection) -> str:
    """What the unanswered probes saw, for the timeout's message: datagrams sent and
    received, send errors (with the newest one's text), datagrams dropped and why."""
    out = [f"{conn.sent_packets} datagrams sent, {endpoint.recv_calls} received"]
    if endpoint.send_errors:
        out.append(f"{endpoint.send_errors} send errors ({endpoint.last_send_error})")
    dropped = {k: n for k, n in conn.drops.items() if n}
    if endpoint.unknown_cid:
        dropped["unknown connection"] = endpoint.unknown_cid
    if dropped:
        out.append("dropped: " + ", ".join(f"{n} {k}" for k, n in dropped.items()))
    return "; ".join(out)

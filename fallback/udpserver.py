"""The daemon's UDP path: one socket for every session, demultiplexed by connection id.

``UdpService.start`` binds ``bind_udp_port`` (on ``bind_ip_address``, else
``bind_address``) next to the HTTP listeners; a daemon whose UDP port cannot be
bound says so once and serves HTTP(S) alone (``/info`` then says ``udp: false``).

A session gets its UDP path from ``POST /.fallback/v1/session/{id}/udp``
(``udp_path``, authenticated by the session token like every session call): a
fresh 64-bit connection id, the key material (``fallback.udpcontrol``), the port,
the datagram size and the flow that applies (the server's
``<transfer><in|out><bandwidth><flow>`` wins over what the client asks,
``sessions.effective_flow``). Its ``UdpPump`` (``fallback.udpblocks``) feeds the
session's ``BlockSink`` (upload) or leases from its ``BlockSender`` (download): the
same objects the HTTP streams use. Asking again replaces the session's UDP path.

Strangers: a datagram naming no connection costs the endpoint a struct unpack;
one naming a connection but failing its checks (replay, AEAD) is dropped by the
core before anything is allocated for it. Both are counted, and ``_watch`` writes
one line per kind per ``ratelog.PERIOD`` (``RateLimitedLog``); nothing a stranger
sends reaches a session's files.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from fallback import sessions as S
from fallback.config import Config
from fallback.control import Flow
from fallback.daemonctx import read_message, scheme_of, session_of, state_of
from fallback.errors import NotOffered
from fallback.ratelog import RateLimitedLog
from fallback.udpblocks import UdpPump, udp_config
from fallback.udpcontrol import MAX_VERSION, UdpFigures, UdpOffer, UdpRequest
from transport.errors import ErrorKind, ProtocolError, TransportError
from transport.udp.aio import UdpEndpoint
from transport.udp.connection import UdpConnection
from transport.udp.crypto import X25519Exchange, derive_path_keys, new_path_secret

log = logging.getLogger("fallback.daemon")
drop_log = RateLimitedLog(log)
WATCH_INTERVAL = 0.5
"""Seconds between the service's checks: liveness of each session's UDP path, bytes
moved, dropped datagrams to report."""


@dataclass(slots=True)
class SessionUdp:
    """A session's UDP path on the daemon."""

    session: S.Session
    pump: UdpPump
    heard: float = 0.0
    moved: int = 0
    retired: bool = False

    @property
    def address(self) -> str:
        peer = self.pump.conn.peer
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    async def drain(self) -> None:
        """Every datagram piece received so far is in the session's sink (before a commit)."""
        await self.pump.drained()

    def tally(self) -> None:
        """What the path carried and when it last heard the client, into the session."""
        conn, pump = self.pump.conn, self.pump
        if conn.last_heard > self.heard or pump.moved > self.moved:
            self.session.heard("udp", self.address, pump.moved - self.moved)
            self.heard, self.moved = conn.last_heard, pump.moved

    def retire(self) -> None:
        """Add this path's sender figures to the session's (once): bytes sent again,
        datagrams sent and lost, the last RTT (``UdpFigures`` in the close answer)."""
        if self.retired:
            return
        self.retired = True
        st = self.pump.conn.stats()
        f = self.session.udp_figures
        for key, value in (("retransmitted_bytes", st.retransmitted_bytes),
                           ("sent_packets", st.sent_packets),
                           ("lost_packets", st.loss_pct / 100 * st.sent_packets)):
            f[key] = f.get(key, 0) + value
        if st.rtt_ms:
            f["rtt_ms"] = st.rtt_ms
        f["datagram_size"] = st.datagram_size

    def close(self) -> None:
        self.tally()
        self.retire()
        st = self.pump.conn.stats()
        log.info("session %s: UDP path %016x: %d datagrams sent, %d received, %.2f %% lost, "
                 "%d bytes sent again, rtt %.2f ms, rate %.1f Mbit/s (%s, %s), "
                 "%d-byte datagrams",
                 self.session.id[:8], self.pump.conn.connection_id, st.sent_packets,
                 st.received_packets, st.loss_pct, st.retransmitted_bytes, st.rtt_ms,
                 st.rate / 1e6, st.controller, st.controller_state, st.datagram_size)
        self.pump.close("session closed")


class UdpService:
    """The daemon's UDP endpoint and the sessions' paths on it."""

    def __init__(self, endpoint: UdpEndpoint) -> None:
        self.endpoint = endpoint
        self.port = int(endpoint.address[1])
        self.paths: dict[int, SessionUdp] = {}
        self._unknown = 0
        self._drops: dict[str, int] = {}
        self._watcher = asyncio.ensure_future(self._watch())

    @classmethod
    async def start(cls, config: Config) -> UdpService | None:
        """Bind the UDP port; None (and one warning) when it is disabled or cannot be bound."""
        if not config.enable_udp:
            log.info("UDP path disabled")
            return None
        host = config.bind_ip_address or config.bind_address
        try:
            endpoint = await UdpEndpoint.bind(host, config.bind_udp_port)
        except OSError as exc:
            log.warning("UDP: cannot bind %s:%d (%s): serving HTTP(S) only", host,
                        config.bind_udp_port, exc.strerror or exc)
            return None
        log.info("UDP path on %s:%d", host, endpoint.address[1])
        return cls(endpoint)

    def attach(self, session: S.Session, msg: UdpRequest, flow: Flow) -> UdpOffer:
        """A new UDP path for ``session`` (replacing its previous one); the offer to answer.
        ``ProtocolError`` (400) for a malformed X25519 key."""
        old = session.udp
        if isinstance(old, SessionUdp):
            old.close()
        key: bytes | None = None
        pub: bytes | None = None
        if msg.x25519 is not None:
            ex = X25519Exchange()
            try:
                secret = ex.path_secret(msg.x25519, session.id, initiator=False)
            except ValueError as exc:
                raise ProtocolError(f"udp request: {exc}") from None
            pub = ex.public_bytes
        else:
            secret = key = new_path_secret()
        cid = secrets.randbits(64)
        while cid in self.paths or cid == 0:
            cid = secrets.randbits(64)
        block = max((e.layout().max_stored_block for e in session.entries if not e.is_dir),
                    default=1)
        upload = session.direction == "upload"
        # The client sends an upload: the cap binds it through the offer's flow, and this
        # end drops what a client ignoring it sends beyond the cap (UdpConfig.receive_cap).
        version = min(msg.version, MAX_VERSION)  # 2: hole pieces both ways
        conn = UdpConnection(udp_config(msg.datagram_size, flow, block, police=upload,
                                        base=msg.base_datagram_size, version=version), cid,
                             derive_path_keys(secret, initiator=False), time.perf_counter())
        def failed(exc: TransportError) -> None:  # an authenticated peer's refused pieces,
            log.warning("session %s: UDP path %016x closed: %s",  # or a source that failed
                        session.id[:8], cid, exc.message)
            if session.error is None and not upload:
                session.error = exc.message

        pump = UdpPump(conn, self.endpoint, f"udp-{cid:016x}",
                       sender=None if upload else session.feed,
                       sink=session.sink if upload else None, on_fail=failed)
        su = SessionUdp(session, pump, conn.last_heard)
        session.udp = su
        self.paths[cid] = su
        if not upload:
            pump.start_ticker()
        log.info("session %s: UDP path %016x, %s-byte datagrams, policy %s, target %s",
                 session.id[:8], cid, f"{msg.base_datagram_size} to {msg.datagram_size}"
                 if msg.base_datagram_size else msg.datagram_size, flow.policy,
                 f"{flow.target_rate / 1e6:g} Mbit/s" if flow.target_rate else "none")
        return UdpOffer(cid, self.port, msg.datagram_size, flow, key, pub, version)

    async def _watch(self) -> None:
        """Liveness and bytes of each path into its session; dropped datagrams into the log."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self._check()
            except Exception:  # never let the watcher die: it is the drop log
                log.exception("UDP watcher")

    def _check(self) -> None:
        ep = self.endpoint
        if ep.unknown_cid > self._unknown:
            drop_log.warning("udp-unknown", "UDP: %d datagrams dropped: no such connection "
                             "(unknown connection id, or too short)", ep.unknown_cid - self._unknown)
            self._unknown = ep.unknown_cid
        for cid, su in list(self.paths.items()):
            conn, pump = su.pump.conn, su.pump
            for kind, n in conn.drops.items():
                if n:
                    key = f"{cid}:{kind}"
                    before = self._drops.get(key, 0)
                    if n > before:
                        self._drops[key] = n
                        drop_log.warning(f"udp-{kind}", "UDP: %d datagrams dropped on a "
                                         "session's connection (%s)", n - before, kind)
            s = su.session
            if not s.closed:
                su.tally()
            if s.closed or (conn.closed and pump.closed is not None):
                su.retire()
                del self.paths[cid]
                for k in [k for k in self._drops if k.startswith(f"{cid}:")]:
                    del self._drops[k]
                if s.udp is su:
                    s.udp = None

    async def close(self) -> None:
        """Close every path (their CLOSE datagrams leave first), then the socket."""
        self._watcher.cancel()
        for su in list(self.paths.values()):
            if not su.pump.conn.closed:
                su.close()
        self.endpoint.wake()
        await asyncio.sleep(0.01)
        self.endpoint.close()


async def udp_close(request: web.Request) -> web.Response:
    """``DELETE /.fallback/v1/session/{id}/udp``: the client left the session's UDP path
    (failover to HTTP(S), issue 13): close it, its leases back to the session's scheduler
    for the HTTP(S) streams. ``{"closed": false}`` when the session had none."""
    session = session_of(request, None, "udp")
    su = session.udp
    if not isinstance(su, SessionUdp):
        return web.json_response({"closed": False})
    log.info("session %s: the client left UDP path %016x", session.id[:8],
             su.pump.conn.connection_id)
    su.close()
    session.udp = None
    return web.json_response({"closed": True})


async def udp_path(request: web.Request) -> web.Response:
    """``POST /.fallback/v1/session/{id}/udp``: ``UdpRequest`` -> ``UdpOffer`` (see
    ``fallback.udpcontrol``). 501 when the daemon has no UDP path, 409 before an
    upload is planned, 400 over plain HTTP without an X25519 key."""
    st = state_of(request)
    session = session_of(request, None, "udp")
    S.check_access(session, st.config.user(session.user), session.direction, "udp")
    msg = await read_message(request, UdpRequest.from_json)
    service = st.udp
    if not isinstance(service, UdpService):
        raise NotOffered("this daemon has no UDP path (disabled, or its port could not "
                         "be bound)")
    upload = session.direction == "upload"
    if (session.sink if upload else session.feed) is None:
        raise ProtocolError("plan the upload before opening its UDP path", kind=ErrorKind.CONFLICT)
    if scheme_of(request) == "http" and msg.x25519 is None:
        raise ProtocolError("over plain HTTP the UDP key is agreed with X25519: send x25519")
    flow = S.effective_flow(st.config.flow_in if upload else st.config.flow_out, msg.flow)
    return web.json_response(service.attach(session, msg, flow).to_json())


def udp_figures(session: S.Session) -> UdpFigures | None:
    """What the session's UDP paths sent (its open path included), for the close answer;
    None when it had none or sent nothing (an upload: the client is the sender)."""
    if isinstance(session.udp, SessionUdp):
        session.udp.retire()
    f = session.udp_figures
    if not f.get("sent_packets"):
        return None
    sent = f["sent_packets"]  # loss: per path lost / resolved, weighted by datagrams sent
    return UdpFigures(int(f.get("retransmitted_bytes", 0)), int(sent),
                      min(100.0, 100.0 * f.get("lost_packets", 0) / sent),
                      float(f.get("rtt_ms", 0.0)), int(f.get("datagram_size", 0)))

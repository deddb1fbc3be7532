"""The typed control client: one method per control call, messages in and out.

Requests are the ``fallback.control`` dataclasses the daemon parses, answers the
``fallback.answers`` dataclasses it builds, so both ends share one definition of
each message. Every answer is checked (``fallback.answers``) before the engine
sees it, with the bounds only the client knows (which files it planned, how many
blocks each has). Transport errors come from ``fallback.remote.Remote.call``:
``ConnectError`` (no connection), ``ConnectionLost``, ``RemoteError`` (the
daemon's error answer), ``ProtocolError`` (an answer that is not what it must be).
"""

from __future__ import annotations

import asyncio
import logging

from fallback import answers as A
from fallback import control as C
from fallback.remote import Remote
from transport.errors import ProtocolError, TransportError

log = logging.getLogger("fallback.client")


class ControlClient:
    """The control calls of one session on ``remote`` (``docs/protocol.md``)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.calls = 0

    def _url(self, tail: str) -> str:
        return self.remote.session_url(tail)

    async def _post(self, tail: str, body: dict[str, object]) -> object:
        self.calls += 1
        return await self.remote.call("POST", self._url(tail), body)

    # -- opening ----------------------------------------------------------------------
    async def open_upload(self, msg: C.OpenUpload) -> A.UploadOpened:
        self.calls += 1
        raw = await self.remote.open(msg.to_json(lazy=True))
        return A.UploadOpened.from_json(raw, len(msg.entries))

    async def open_download(self, msg: C.OpenDownload) -> A.DownloadOpened:
        self.calls += 1
        return A.download_answer(await self.remote.open(msg.to_json()))

    # -- upload -----------------------------------------------------------------------
    async def plan(self, msg: C.PlanRequest, counts: dict[int, int]) -> A.PlanAnswer:
        """``counts``: block count of each file we plan to send (the answer's bounds)."""
        return A.PlanAnswer.from_json(await self._post("/plan", msg.to_json(lazy=True)), counts)

    async def commit(self, msg: C.CommitRequest, counts: dict[int, int]) -> A.CommitAnswer:
        return A.CommitAnswer.from_json(await self._post("/commit", msg.to_json(lazy=True)), counts)

    # -- download ---------------------------------------------------------------------
    async def digests(self, msg: C.DigestsRequest) -> A.DigestsAnswer:
        return A.DigestsAnswer.from_json(await self._post("/digests", msg.to_json()))

    async def roots(self, msg: C.RootsRequest) -> A.RootsAnswer:
        return A.RootsAnswer.from_json(await self._post("/digests", msg.to_json()), msg.files)

    async def want(self, msg: C.WantRequest) -> A.WantAnswer:
        return A.WantAnswer.from_json(await self._post("/want", msg.to_json()))

    # -- both -------------------------------------------------------------------------
    async def acks(self, msg: C.Acks) -> C.Acks:
        """Send our acknowledgements (a download's journaled and failed blocks), get the
        daemon's (an upload's); the sender checks each range against its files."""
        got = await self._post("/acks", msg.to_json())
        if not isinstance(got, dict):
            raise ProtocolError("refused the daemon's acks answer: not an object")
        try:
            return C.Acks.from_json(got)
        except ProtocolError as exc:
            raise ProtocolError(f"refused the daemon's acks answer: {exc.message}") from None

    async def keepalive(self) -> A.KeepaliveAnswer:
        """The client is alive (``fallback.sessions.IDLE_TAKEOVER``)."""
        got = await self._post("/keepalive", C.KeepaliveRequest().to_json())
        return A.KeepaliveAnswer.from_json(got)

    async def close_udp(self) -> None:
        """The client left the session's UDP path (failover): the daemon closes its end and
        gives back the pieces it held (``DELETE .../udp``). Best effort: a daemon that does
        not know the call, or cannot be reached, loses nothing but time (its UDP path goes
        silent and its leases expire)."""
        self.calls += 1
        try:
            await asyncio.wait_for(self.remote.call("DELETE", self._url("/udp")), 5.0)
        except (TransportError, TimeoutError) as exc:
            log.debug("closing the daemon's UDP path: %s", getattr(exc, "message", exc))

    async def close(self, error: str | None = None) -> None:
        await self.remote.close(error)

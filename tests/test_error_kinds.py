"""Data-plane errors carry kinds, not HTTP statuses; the daemon maps a kind to a status in
one table (``fallback.daemonctx.HTTP_STATUS``); foreign exceptions are mapped once, at
the client's boundary (``transport.errors.map_exceptions``)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import pkgutil
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

import transport
from fallback.daemonctx import HTTP_STATUS, http_status
from fallback.errors import Busy, HttpRefusal, PreconditionFailed
from fallback.known_hosts import CertificateNotTrusted
from transport.blocks.sink import BlockSink
from transport.errors import (
    BadPassphrase,
    ConflictError,
    ConnectError,
    ConnectionLost,
    ErrorKind,
    IntegrityError,
    PathError,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    SourceChanged,
    TransportError,
    from_os_error,
    map_exceptions,
)
from transport.http.client import AIOHTTP_ERRORS, describe, download_stream

ROOT = Path(__file__).parents[1]


def _modules() -> Iterator[object]:
    for info in pkgutil.walk_packages(transport.__path__, "transport."):
        try:
            yield importlib.import_module(info.name)
        except ImportError:  # an optional platform module (none today)
            continue


def _error_classes() -> list[type[BaseException]]:
    seen: dict[str, type[BaseException]] = {}
    for mod in _modules():
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("transport"):
                seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(seen.values())


def test_transport_error_classes_carry_no_status() -> None:
    """No error class of the data plane has a ``status`` (attribute or parameter): what
    went wrong is its ``kind``; the protocol's status is the boundary's business."""
    classes = _error_classes()
    assert TransportError in classes and RemoteError in classes  # the walk found them
    for cls in classes:
        assert not hasattr(cls, "status"), cls
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
        assert "status" not in params, cls
        if issubclass(cls, TransportError):
            assert isinstance(cls.kind, ErrorKind), cls


def _raise_sites(package: str, names: set[str]) -> Iterator[tuple[Path, int, str]]:
    """``(file, line, keyword)`` of every call of an error class in ``package`` that passes
    ``status=`` (or ``status`` positionally through ``**``: none may)."""
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in names:
                for kw in node.keywords:
                    if kw.arg == "status":
                        yield path, node.lineno, name


def test_no_raise_site_passes_a_status() -> None:
    """Every raise site in ``transport/`` and ``fallback/`` names a kind, never a status
    (a 429 or a 412 is its own ``fallback.errors.HttpRefusal`` class)."""
    names = {c.__name__ for c in _error_classes()} | {"Busy", "PreconditionFailed", "HttpRefusal"}
    assert {"PathError", "ProtocolError", "RemoteError"} <= names
    found = [*_raise_sites("transport", names), *_raise_sites("fallback", names)]
    assert found == []


def test_every_kind_has_one_status() -> None:
    """The daemon's table covers every kind, with the statuses it has always answered."""
    assert set(HTTP_STATUS) == set(ErrorKind)
    assert {k.name: s for k, s in HTTP_STATUS.items()} == {
        "BAD_REQUEST": 400, "UNAUTHORIZED": 401, "FORBIDDEN": 403, "NOT_FOUND": 404,
        "CONFLICT": 409, "TOO_LARGE": 413, "INTEGRITY": 422, "EXHAUSTED": 503,
        "UNAVAILABLE": 503, "UNTRUSTED": 495, "REMOTE": 502, "INTERNAL": 500,
    }


@pytest.mark.parametrize(("error", "status"), [
    (TransportError("x"), 500),
    (ProtocolError("x"), 400),
    (IntegrityError("x"), 422),
    (BadPassphrase("x"), 403),
    (ConflictError("x"), 409),
    (PathError("x"), 403),
    (SourceChanged("x"), 409),
    (ResourceExhausted("x", resource="EMFILE"), 503),
    (ConnectionLost("x"), 503),
    (ConnectError("x"), 503),
    (ProtocolError("unknown or expired session", kind=ErrorKind.NOT_FOUND), 404),
    (PathError("session token refused", kind=ErrorKind.UNAUTHORIZED), 401),
    (ProtocolError("control request too large", kind=ErrorKind.TOO_LARGE), 413),
    (ProtocolError("daemon is shutting down", kind=ErrorKind.UNAVAILABLE), 503),
    (Busy("too many parallel streams"), 429),
    (PreconditionFailed("precondition failed"), 412),
    (RemoteError("the peer said no", peer_status=404), 502),
    (CertificateNotTrusted("self-signed", host="h", port=1, presented=None), 495),
])
def test_http_status_of_each_error(error: TransportError, status: int) -> None:
    assert http_status(error) == status


def test_http_refusals_are_fallback_classes_with_their_own_status() -> None:
    assert issubclass(Busy, HttpRefusal) and issubclass(PreconditionFailed, HttpRefusal)
    assert (Busy.status, PreconditionFailed.status) == (429, 412)
    assert not HttpRefusal.__module__.startswith("transport")


def test_os_errors_become_kinds() -> None:
    import errno

    assert from_os_error(OSError(errno.EMFILE, "Too many open files"), "f").kind \
        is ErrorKind.EXHAUSTED
    assert from_os_error(OSError(errno.EACCES, "Permission denied"), "f").kind \
        is ErrorKind.FORBIDDEN
    eio = from_os_error(OSError(errno.EIO, "Input/output error"), "f")
    assert (eio.kind, eio.message) == (ErrorKind.INTERNAL, "f: Input/output error")


# -- map_exceptions: the client's one boundary ---------------------------------------------------------


def test_map_exceptions_first_match_wins_and_others_pass() -> None:
    mapping = {KeyError: None, LookupError: ProtocolError, OSError: ConnectionLost}
    with pytest.raises(ProtocolError) as caught, map_exceptions(mapping, "reading"):
        raise IndexError("no such index")
    assert caught.value.message == "reading: no such index"
    assert isinstance(caught.value.__cause__, IndexError)
    with pytest.raises(KeyError), map_exceptions(mapping, "reading"):  # None: let through
        raise KeyError("k")
    with pytest.raises(ZeroDivisionError), map_exceptions(mapping, "reading"):  # no entry
        raise ZeroDivisionError
    with pytest.raises(SourceChanged), map_exceptions({Exception: ConnectionLost}, "x"):
        raise SourceChanged("ours pass unchanged")


def test_map_exceptions_leaves_cancellation_alone() -> None:
    with pytest.raises(asyncio.CancelledError), map_exceptions({BaseException: ConnectionLost}, "x"):
        raise asyncio.CancelledError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _download(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        return await download_stream(http, url, BlockSink.__new__(BlockSink), headers={},
                                     ssl=False)


def test_refused_connection_is_a_connect_error() -> None:
    """A real refused connection (no listener) becomes ``ConnectError``: nothing was sent."""
    port = _closed_port()
    with pytest.raises(ConnectError) as caught:
        asyncio.run(_download(f"http://127.0.0.1:{port}/blocks"))
    assert caught.value.message.startswith("download stream lost: cannot connect: ")
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


def test_dropped_connection_is_connection_lost() -> None:
    """A peer that accepts and closes without answering: ``ConnectionLost`` (not a connect
    error: the request went out), with aiohttp's text replaced by one plain line."""
    async def main() -> None:
        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await _download(f"http://127.0.0.1:{port}/blocks")

    with pytest.raises(ConnectionLost) as caught:
        asyncio.run(main())
    assert not isinstance(caught.value, ConnectError)
    assert caught.value.message == "download stream lost: the daemon closed the connection"


def test_aiohttp_mapping_orders_subclasses_first() -> None:
    """A certificate refusal is a ``ClientConnectorError`` too, but the handshake ran: it
    must map to ``ConnectionLost``, so its entry comes before its base class's."""
    keys = list(AIOHTTP_ERRORS)
    assert keys.index(aiohttp.ClientConnectorCertificateError) \
        < keys.index(aiohttp.ClientConnectorError)
    assert AIOHTTP_ERRORS[aiohttp.ClientConnectorCertificateError] is ConnectionLost
    assert describe(TimeoutError()) == "timed out"


def test_a_reset_connection_is_described_without_aiohttp_class_names() -> None:
    """Before: "upload stream lost: ClientOSError: [Errno 104] Connection reset by peer"
    reached the user (trial): a library's class name is no message."""
    import errno
    exc = aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
    assert describe(exc) == "connection reset by peer"
    assert describe(aiohttp.ClientOSError()) == "ClientOSError"  # nothing better to say

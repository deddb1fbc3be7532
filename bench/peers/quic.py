"""aioquic and qh3 as loopback peers: one connection, one stream, encrypted (QUIC always is).

Each run is two processes (receiver = QUIC server, sender = client), like
``bench.udp_loopback``, so both sides may have a core. The sender queues a reused 1 MiB
buffer on one stream whenever the stream's unacknowledged send buffer drops under
``HIGH_WATER`` (checked on every datagram it receives, i.e. as acknowledgements arrive),
with ``end_stream`` on the last chunk. The receiver handles ``StreamDataReceived`` directly
(counting bytes, no ``asyncio.StreamReader``: the libraries' default stream readers copy
every byte) and closes the connection when the stream ends.

MB/s is stream bytes over the sender's wall time (first byte queued to the receiver's
close); CPU s/GB is user+system time (``getrusage``) of each process over that transfer
per 10**9 bytes; peak RSS is ``ru_maxrss``.

Settings (the same for both libraries; ``run`` takes them):
- ``datagram``: ``QuicConfiguration.max_datagram_size``. 1472 fills a 1,500-byte MTU;
  the large rows use the largest each library handles (``LARGE``).
- ``window``: ``max_data`` and ``max_stream_data`` (flow-control credit), 16 MiB.
- ``rcvbuf``: the receiving socket's ``SO_RCVBUF(FORCE)``, 4 MiB (qh3's large-datagram
  figure in issue #12 needs it; the kernel default of 208 KiB drops bursts).
- the event loop: plain asyncio. Both libraries time with ``loop.time()``, which under
  uvloop ticks in 1 ms steps and spoils their RTT estimate on loopback.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import multiprocessing as mp
import os
import resource
import socket
import ssl
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

LIBS = ("aioquic", "qh3")
SMALL = 1472
LARGE = {"aioquic": 16384, "qh3": 65000}
CHUNK = 1 << 20
HIGH_WATER = 8 << 20
ALPN = ["fb-bench"]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for ``localhost`` in *directory*: (cert, key) paths."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _configuration(lib: str, args: dict[str, Any], *, client: bool) -> Any:
    conf_mod = importlib.import_module(f"{lib}.quic.configuration")
    conf = conf_mod.QuicConfiguration(is_client=client, alpn_protocols=ALPN,
                                      max_datagram_size=args["datagram"],
                                      max_data=args["window"],
                                      max_stream_data=args["window"])
    if client:
        conf.verify_mode = ssl.CERT_NONE
    else:
        conf.load_cert_chain(args["cert"], args["key"])
    return conf


def _set_rcvbuf(transport: Any, size: int) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or not size:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


async def _receiver(lib: str, args: dict[str, Any], pipe: Connection) -> None:
    aio = importlib.import_module(f"{lib}.asyncio")
    events = importlib.import_module(f"{lib}.quic.events")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    got = {"bytes": 0, "t0": 0.0, "c0": 0.0, "t1": 0.0, "c1": 0.0}

    class Receiver(aio.QuicConnectionProtocol):  # type: ignore[misc,name-defined]
        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                if not got["bytes"]:
                    got["t0"], got["c0"] = time.perf_counter(), _cpu()
                got["bytes"] += len(event.data)
                if event.end_stream:
                    got["t1"], got["c1"] = time.perf_counter(), _cpu()
                    self._quic.close(error_code=0)
                    self.transmit()
                    if not done.done():
                        done.set_result(None)
            elif isinstance(event, events.ConnectionTerminated) and not done.done():
                done.set_result(None)

    server = await aio.serve("127.0.0.1", 0, configuration=_configuration(lib, args,
                                                                         client=False),
                             create_protocol=Receiver)
    _set_rcvbuf(server._transport, args["rcvbuf"])
    pipe.send(server._transport.get_extra_info("sockname")[:2])
    try:
        await asyncio.wait_for(done, args["timeout"])
    except TimeoutError:
        got["t1"], got["c1"] = time.perf_counter(), _cpu()
    await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE leave
    pipe.send({"bytes": got["bytes"], "wall": got["t1"] - got["t0"],
               "cpu": got["c1"] - got["c0"], "rss_mb": _maxrss_mb()})
    server.close()


def _sending_protocol(lib: str, total: int, done: asyncio.Future[None], state: dict[str, int],
                      *, adopt_stream: bool) -> Any:
    """The protocol class of a side that sends ``total`` bytes on stream ``state["sid"]``,
    keeping at most ``HIGH_WATER`` buffered (topped up as acknowledgements arrive).
    ``adopt_stream``: the stream is the first one the peer opens (the serving side);
    else the caller sets ``state["sid"]``. ``done`` resolves when the connection ends."""
    aio = importlib.import_module(f"{lib}.asyncio")
    events = importlib.import_module(f"{lib}.quic.events")
    data = memoryview(os.urandom(CHUNK))

    class Sending(aio.QuicConnectionProtocol):  # type: ignore[misc,name-defined]
        def top_up(self) -> None:
            sid, quic = state["sid"], self._quic
            while (sid >= 0 and state["queued"] < total
                   and _buffered(lib, quic, sid) < HIGH_WATER):
                n = min(CHUNK, total - state["queued"])
                state["queued"] += n
                quic.send_stream_data(sid, data[:n], end_stream=state["queued"] >= total)

        def datagram_received(self, data: Any, addr: Any) -> None:
            super().datagram_received(data, addr)
            if state["queued"] < total:
                self.top_up()
                self.transmit()

        def datagrams_received(self, data: Any, addr: Any) -> None:  # qh3 (GRO batches)
            super().datagrams_received(data, addr)
            if state["queued"] < total:
                self.top_up()
                self.transmit()

        def quic_event_received(self, event: Any) -> None:
            if adopt_stream and isinstance(event, events.StreamDataReceived) \
                    and state["sid"] < 0:
                state["sid"] = event.stream_id
                self.top_up()
            elif isinstance(event, events.ConnectionTerminated) and not done.done():
                done.set_result(None)

    return Sending


async def _sender(lib: str, args: dict[str, Any], pipe: Connection,
                  address: tuple[str, int]) -> None:
    aio = importlib.import_module(f"{lib}.asyncio")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    total = args["mb"] << 20
    state = {"queued": 0, "sid": -1}

    Sender = _sending_protocol(lib, total, done, state, adopt_stream=False)

    conf = _configuration(lib, args, client=True)
    async with aio.connect(address[0], address[1], configuration=conf,
                           create_protocol=Sender) as proto:
        _set_rcvbuf(proto._transport, args["rcvbuf"])
        t0, c0 = time.perf_counter(), _cpu()
        state["sid"] = proto._quic.get_next_available_stream_id()
        proto.top_up()
        proto.transmit()
        try:
            await asyncio.wait_for(done, args["timeout"])
        except TimeoutError:
            pass
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    pipe.send({"bytes": state["queued"], "wall": wall, "cpu": cpu, "rss_mb": _maxrss_mb()})


def _receiver_main(lib: str, args: dict[str, Any], pipe: Connection) -> None:
    asyncio.run(_receiver(lib, args, pipe))


def _sender_main(lib: str, args: dict[str, Any], pipe: Connection,
                 address: tuple[str, int]) -> None:
    asyncio.run(_sender(lib, args, pipe, address))


def available(lib: str) -> bool:
    """True when *lib* (``aioquic`` or ``qh3``) imports (the ``[bench]`` extra)."""
    try:
        importlib.import_module(f"{lib}.asyncio")
    except ImportError:
        return False
    return True


def _wait(pipe: Connection, proc: Any, timeout: float) -> bool:
    """Wait for a message on *pipe* while *proc* lives (a crashed side fails fast)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pipe.poll(0.2):
            return True
        if not proc.is_alive():
            return pipe.poll(0)
    return False


def run(lib: str, mb: int, datagram: int, *, window: int = 16 << 20, rcvbuf: int = 4 << 20,
        timeout: float = 300.0) -> dict[str, Any]:
    """Move *mb* MiB over one stream from a *lib* client to a *lib* server on loopback.

    Returns ``{"sender": {...}, "receiver": {...}}``, each with ``bytes``, ``wall`` (s),
    ``cpu`` (s) and ``rss_mb``. The receiver's ``bytes`` is what arrived: less than
    ``mb`` MiB when the run hit *timeout*.
    """
    with tempfile.TemporaryDirectory(prefix="fb-quic-") as tmp:
        cert, key = make_cert(Path(tmp))
        args = {"datagram": datagram, "window": window, "rcvbuf": rcvbuf, "mb": mb,
                "timeout": timeout, "cert": str(cert), "key": str(key)}
        ctx = mp.get_context("spawn")
        r_parent, r_child = ctx.Pipe()
        s_parent, s_child = ctx.Pipe()
        receiver = ctx.Process(target=_receiver_main, args=(lib, args, r_child))
        receiver.start()
        try:
            if not _wait(r_parent, receiver, 30):
                raise RuntimeError(f"{lib} receiver did not start")
            address = r_parent.recv()
            sender = ctx.Process(target=_sender_main, args=(lib, args, s_child, address))
            sender.start()
            try:
                if not _wait(s_parent, sender, timeout + 30):
                    raise RuntimeError(f"{lib} sender did not report")
                s = s_parent.recv()
                if not _wait(r_parent, receiver, 30):
                    raise RuntimeError(f"{lib} receiver did not report")
                r = r_parent.recv()
            finally:
                sender.join(10)
                if sender.is_alive():
                    sender.kill()
        finally:
            receiver.join(10)
            if receiver.is_alive():
                receiver.kill()
    return {"sender": s, "receiver": r}


# -- download roles for the emulated link (``python -m bench.peers.quic serve|fetch``) ------
# On a WAN row the sender is the server in namespace B (a download, as for the other
# peers): ``serve`` sends ``--mb`` MiB on the stream each client opens, then waits for the
# client to close; ``fetch`` (namespace A, the measured process) opens a stream, counts what
# arrives and prints one JSON line ``{"bytes", "seconds"}`` at the end of the stream or at
# its own ``--deadline`` (so a capped run still reports the bytes that made it).


async def _serve(lib: str, args: dict[str, Any]) -> None:
    aio = importlib.import_module(f"{lib}.asyncio")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    total = args["mb"] << 20
    state = {"queued": 0, "sid": -1}

    Server = _sending_protocol(lib, total, done, state, adopt_stream=True)

    server = await aio.serve(args["bind"], args["port"],
                             configuration=_configuration(lib, args, client=False),
                             create_protocol=Server)
    _set_rcvbuf(server._transport, args["rcvbuf"])
    print(json.dumps({"ready": server._transport.get_extra_info("sockname")[1]}), flush=True)
    try:
        await asyncio.wait_for(done, args["timeout"])
    except TimeoutError:
        pass
    server.close()


async def _fetch(lib: str, args: dict[str, Any]) -> dict[str, Any]:
    aio = importlib.import_module(f"{lib}.asyncio")
    events = importlib.import_module(f"{lib}.quic.events")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    got = {"bytes": 0}

    class Client(aio.QuicConnectionProtocol):  # type: ignore[misc,name-defined]
        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                got["bytes"] += len(event.data)
                if event.end_stream and not done.done():
                    done.set_result(None)
            elif isinstance(event, events.ConnectionTerminated) and not done.done():
                done.set_result(None)

    t0 = time.perf_counter()
    conf = _configuration(lib, args, client=True)
    async with aio.connect(args["host"], args["port"], configuration=conf,
                           create_protocol=Client) as proto:
        _set_rcvbuf(proto._transport, args["rcvbuf"])
        sid = proto._quic.get_next_available_stream_id()
        proto._quic.send_stream_data(sid, b"get", end_stream=True)
        proto.transmit()
        left = args["deadline"] - (time.perf_counter() - t0)
        await asyncio.wait({done}, timeout=max(left, 0.1))  # (wait_for would cancel it)
        seconds, complete = time.perf_counter() - t0, done.done()
        proto.close()
    return {"bytes": got["bytes"], "seconds": seconds, "complete": complete}


def _buffered(lib: str, quic: Any, sid: int) -> int:
    """Bytes queued on stream *sid* and not yet acknowledged."""
    if lib == "qh3":
        return int(quic.get_send_buffer_size(sid))
    stream = quic._streams.get(sid)
    return 0 if stream is None else len(stream.sender._buffer)


def main(argv: list[str] | None = None) -> int:
    """``serve``: send ``--mb`` MiB to each client; ``fetch``: download and print JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.peers.quic")
    p.add_argument("role", choices=["serve", "fetch"])
    p.add_argument("--lib", choices=LIBS, default="aioquic")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4433)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--datagram", type=int, default=SMALL)
    p.add_argument("--window", type=int, default=16 << 20)
    p.add_argument("--rcvbuf", type=int, default=4 << 20)
    p.add_argument("--timeout", type=float, default=600.0, help="serve: give up after (s)")
    p.add_argument("--deadline", type=float, default=60.0, help="fetch: report after (s)")
    a = p.parse_args(argv)
    args = {"datagram": a.datagram, "window": a.window, "rcvbuf": a.rcvbuf, "mb": a.mb,
            "timeout": a.timeout, "deadline": a.deadline, "bind": a.bind, "host": a.host,
            "port": a.port}
    if a.role == "serve":
        with tempfile.TemporaryDirectory(prefix="fb-quic-") as tmp:
            cert, key = make_cert(Path(tmp))
            args |= {"cert": str(cert), "key": str(key)}
            asyncio.run(_serve(a.lib, args))
        return 0
    print(json.dumps(asyncio.run(_fetch(a.lib, args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

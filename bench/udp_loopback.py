"""UDP path on loopback: MB/s and CPU seconds per GB for sender and receiver.

Two processes (one per side, so each may have a core), each with its own event loop
(uvloop when installed), endpoint and ``UdpConnection``; every datagram is sealed with
AES-256-GCM. The sender queues synthetic pieces from one 1 MiB buffer as the core asks
(``SendReady``) and re-queues lost ones; it closes once every byte is acknowledged.
For each datagram size and GSO/GRO setting it prints one line::

    python -m bench.udp_loopback                       # 1452 and 65000 bytes, GSO on and off
    python -m bench.udp_loopback --mb 256 --datagram 1452 --gso on
    python -m bench.udp_loopback --compare             # ours vs aioquic and qh3, 500 MB each
    python -m bench.udp_loopback --memory 10           # 10 GB to /dev/null: peak RSS per side

MB/s is piece bytes over the sender's wall time (first send to last acknowledgement);
CPU s/GB is user+system time of each process per 10**9 piece bytes; RSS is each
process's peak (``ru_maxrss``). ``--sink PATH`` makes the receiver write every piece at its
place (``pwrite``; ``/dev/null`` or a sparse file): the data is streamed, never held. The
machine's load average is printed with the results: figures from a shared machine are
lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from transport.udp import RateConfig, UdpConfig, UdpConnection, derive_path_keys
from transport.udp.aio import UdpEndpoint
from transport.udp.events import (
    Closed,
    Event,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    SendReady,
)
from transport.udp.sockopt import tune_malloc

BLOCK = 1 << 20
CID = 0x5EED


def _maxrss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (its own address space's high-water mark).
    Not ``ru_maxrss``: Linux carries the parent's peak across fork + exec into it, so a
    spawned child of a 200 MB pytest process read 200 MB whatever it used."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _run(coro: Any) -> Any:
    tune_malloc()
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _config(args: dict[str, Any]) -> UdpConfig:
    return UdpConfig(datagram_size=args["datagram"], max_queue_bytes=16 << 20,
                     rate=RateConfig(policy=args["policy"], target_rate=args["target"]))


async def _receiver(args: dict[str, Any], pipe: Connection) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0, gso=args["gso"], gro=args["gso"])
    pipe.send(ep.address)
    conn = UdpConnection(_config(args), CID, derive_path_keys(args["secret"], initiator=False),
                         time.perf_counter())
    done = asyncio.get_running_loop().create_future()
    got = [0, 0.0, 0.0]  # bytes, first time, cpu at first
    sink = os.open(args["sink"], os.O_WRONLY | os.O_CREAT, 0o600) if args.get("sink") else -1

    def on_event(c: UdpConnection, ev: Event) -> None:
        if isinstance(ev, PiecesReceived):
            if not got[0]:
                got[1], got[2] = time.perf_counter(), _cpu()
            got[0] += sum(len(p[3]) for p in ev.pieces)
            if sink >= 0:
                for _f, block, off, data in ev.pieces:
                    os.pwrite(sink, data, block * BLOCK + off)
        elif isinstance(ev, Closed) and not done.done():
            done.set_result(None)

    ep.add(conn, on_event)
    try:
        await asyncio.wait_for(done, args["timeout"])
    except TimeoutError:
        pass
    pipe.send({"bytes": got[0], "wall": time.perf_counter() - got[1], "cpu": _cpu() - got[2],
               "drops": sum(conn.stats().drops.values()), "features": ep.features,
               "recv_calls": ep.recv_calls, "rss_mb": _maxrss_mb()})
    ep.close()
    if sink >= 0:
        os.close(sink)


async def _sender(args: dict[str, Any], pipe: Connection, address: Any) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0, gso=args["gso"], gro=args["gso"])
    total = args["mb"] << 20
    t0, c0 = time.perf_counter(), _cpu()
    conn = UdpConnection(_config(args), CID, derive_path_keys(args["secret"], initiator=True),
                         t0, peer=address)
    data = os.urandom(BLOCK)
    state: dict[str, Any] = {"next": 0, "acked": 0, "lost": []}
    done = asyncio.get_running_loop().create_future()

    def feed(c: UdpConnection) -> None:
        lost = state["lost"]
        while lost and c.send_budget() >= lost[-1][3]:
            f, b, off, n = lost.pop()
            c.queue_piece(f, b, off, memoryview(data)[off:off + n], retransmission=True)
        while state["next"] < total // BLOCK and c.send_budget() >= BLOCK:
            c.queue_piece(0, state["next"], 0, data)
            state["next"] += 1

    def on_event(c: UdpConnection, ev: Event) -> None:
        if isinstance(ev, PiecesAcked):
            state["acked"] += sum(p[3] for p in ev.pieces)
            if state["acked"] >= total and not done.done():
                done.set_result(time.perf_counter())
        elif isinstance(ev, PiecesLost):
            state["lost"].extend(ev.pieces)
            feed(c)
        elif isinstance(ev, SendReady):
            feed(c)

    feed(conn)
    ep.add(conn, on_event)
    try:
        end = await asyncio.wait_for(done, args["timeout"])
    except TimeoutError:
        end = time.perf_counter()
    wall, cpu = end - t0, _cpu() - c0
    st = conn.stats()
    conn.close(time.perf_counter(), 0, "done")
    ep.wake()
    await asyncio.sleep(0.05)
    pipe.send({"bytes": state["acked"], "wall": wall, "cpu": cpu, "lost": st.lost_bytes,
               "spurious": st.spurious_losses, "rtt_ms": st.rtt_ms, "rate": st.rate,
               "queue_ms": st.queue_delay_ms, "send_calls": ep.send_calls,
               "features": ep.features, "rss_mb": _maxrss_mb()})
    ep.close()


def _receiver_main(args: dict[str, Any], pipe: Connection) -> None:
    _run(_receiver(args, pipe))


def _sender_main(args: dict[str, Any], pipe: Connection, address: Any) -> None:
    _run(_sender(args, pipe, address))


def run_one(args: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_main, args=(args, r_child))
    receiver.start()
    address = r_parent.recv()
    sender = ctx.Process(target=_sender_main, args=(args, s_child, address))
    sender.start()
    s = s_parent.recv()
    r = r_parent.recv()
    sender.join()
    receiver.join()
    return {"sender": s, "receiver": r}


def ours(mb: int, datagram: int, *, gso: bool = True, policy: str = "fair",
         target: float | None = None, sink: str | None = None,
         timeout: float = 300.0) -> dict[str, Any]:
    """One run of ours (a fresh path secret): ``{"sender": {...}, "receiver": {...}}``."""
    return run_one({"datagram": datagram, "gso": gso, "mb": mb, "policy": policy,
                    "target": target, "secret": os.urandom(32), "timeout": timeout,
                    "sink": sink})


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the comparison: MB/s over the sender's wall time (10**6 B/s), CPU
    seconds per 10**9 bytes and peak RSS (MiB) of each process; ``note`` when it failed."""

    peer: str
    datagram: int
    bytes: int
    seconds: float
    send_cpu_s: float
    recv_cpu_s: float
    send_rss_mb: float
    recv_rss_mb: float
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def cpu_per_gb(self, side: str) -> float:
        cpu = self.send_cpu_s if side == "send" else self.recv_cpu_s
        return cpu / (self.bytes / 1e9) if self.bytes else 0.0


def _row(peer: str, datagram: int, res: dict[str, Any], expected: int) -> Row:
    s, r = res["sender"], res["receiver"]
    got = min(s["bytes"], r["bytes"])
    note = "" if got >= expected else f"incomplete: {got} of {expected} bytes"
    return Row(peer, datagram, got, s["wall"], s["cpu"], r["cpu"], s["rss_mb"], r["rss_mb"],
               note)


def compare(mb: int = 477, *, peers: tuple[str, ...] = ("aioquic", "qh3"),
            timeout: float = 300.0, log: Any = None) -> list[Row]:
    """Ours at 1452 and 65000 bytes, then each QUIC peer at 1472 bytes and at its largest
    datagram (``bench.peers.quic.LARGE``), *mb* MiB each (477 MiB = 500 MB), one after
    the other on the same machine. A peer that is not installed or fails gets a row with
    a note and zero bytes."""
    from bench.peers import quic

    plan: list[tuple[str, int]] = [("ours", 1452), ("ours", 65000)]
    for lib in peers:
        plan += [(lib, quic.SMALL), (lib, quic.LARGE[lib])]
    rows: list[Row] = []
    for peer, size in plan:
        try:
            if peer == "ours":
                res = ours(mb, size, timeout=timeout)
            elif not quic.available(peer):
                rows.append(Row(peer, size, 0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                f"not measured ({peer} not installed: pip install '.[bench]')"))
                continue
            else:
                res = quic.run(peer, mb, size, timeout=timeout)
            rows.append(_row(peer, size, res, mb << 20))
        except Exception as exc:  # noqa: BLE001 - one broken peer becomes a row with a note
            rows.append(Row(peer, size, 0, 0.0, 0.0, 0.0, 0.0, 0.0,
                            f"failed: {type(exc).__name__}: {exc}"[:200]))
        if log is not None:
            log(format_row(rows[-1]))
    return rows


HEAD = (f"{'peer':<8} {'datagram':>8} {'MB':>7} {'MB/s':>8} {'send CPU s/GB':>13} "
        f"{'recv CPU s/GB':>13} {'send RSS MB':>11} {'recv RSS MB':>11}")


def format_row(r: Row) -> str:
    if not r.bytes:
        return f"{r.peer:<8} {r.datagram:>8} {r.note}"
    return (f"{r.peer:<8} {r.datagram:>8} {r.bytes / 1e6:>7.0f} {r.mb_s:>8.1f} "
            f"{r.cpu_per_gb('send'):>13.2f} {r.cpu_per_gb('recv'):>13.2f} "
            f"{r.send_rss_mb:>11.1f} {r.recv_rss_mb:>11.1f}" + (f"  {r.note}" if r.note else ""))


def ratios(rows: list[Row]) -> list[str]:
    """"ours / qh3" lines for equal datagram classes (small, large)."""
    out = []
    for label, pick in (("default datagram", lambda r: r.datagram < 10000),
                        ("largest datagram", lambda r: r.datagram >= 10000)):
        o = [r for r in rows if r.peer == "ours" and pick(r) and r.bytes]
        q = [r for r in rows if r.peer == "qh3" and pick(r) and r.bytes]
        if o and q:
            out.append(f"ours / qh3, {label}: {o[0].mb_s / q[0].mb_s:.1f} x")
    return out


def scenario_rows(scenario: str, mb: int, wants: Any = lambda key: True,
                  log: Any = None) -> list[Any]:
    """``compare`` as report rows (``bench.results.PeerResult``) for ``python -m bench
    udp-loopback``: peer ``ours-udp-1452``, ``aioquic-1472``, ...; the sender counts as the
    server side, the receiver as the client (a download). *wants* filters on the peer
    key (``ours-udp*``, ``aioquic*``, ``qh3*``)."""
    from bench.results import PeerResult

    peers = tuple(p for p in ("aioquic", "qh3") if wants(f"{p}-x"))
    rows = compare(mb, peers=peers, log=log)
    out = []
    for r in rows:
        key = f"ours-udp-{r.datagram}" if r.peer == "ours" else f"{r.peer}-{r.datagram}"
        if not wants(key):
            continue
        status = "ok" if r.bytes and not r.note else "failed" if r.note.startswith(
            ("failed", "incomplete")) else "skipped"
        out.append(PeerResult(scenario, key, "down", "host", status, r.bytes, r.seconds,
                              client_cpu_s=r.recv_cpu_s, server_cpu_s=r.send_cpu_s,
                              client_rss_mb=r.recv_rss_mb, server_rss_mb=r.send_rss_mb,
                              note=r.note or f"{r.datagram}-byte datagrams"))
    for line in ratios(rows):
        out.append(PeerResult(scenario, "ours/qh3", "-", status="info", note=line))
    return out


def memory(gb: float, datagram: int = 1452, sink: str = "/dev/null",
           timeout: float = 3600.0) -> Row:
    """Move *gb* GiB with ours, the receiver writing every piece to *sink*: peak RSS."""
    mb = int(gb * 1024)
    return _row("ours", datagram, ours(mb, datagram, sink=sink, timeout=timeout), mb << 20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=0, help="MiB per run (default 512 at 1452 B, "
                   "2048 at 65000 B; --compare: 477 = 500 MB)")
    p.add_argument("--datagram", type=int, action="append", help="datagram sizes (repeat)")
    p.add_argument("--gso", choices=["on", "off", "both"], default="both")
    p.add_argument("--policy", default="fair")
    p.add_argument("--target", type=float, default=None, help="target rate, bits/s")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--sink", default=None, help="receiver writes pieces here (pwrite)")
    p.add_argument("--compare", action="store_true",
                   help="ours, aioquic and qh3 at their default and largest datagrams")
    p.add_argument("--peers", default="aioquic,qh3", help="--compare: QUIC peers to run")
    p.add_argument("--memory", type=float, default=0.0, metavar="GIB",
                   help="move this many GiB to --sink (default /dev/null); peak RSS per side")
    opts = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if opts.compare:
        print(HEAD, flush=True)
        rows = compare(opts.mb or 477, timeout=max(opts.timeout, 300.0),
                       peers=tuple(x for x in opts.peers.split(",") if x),
                       log=lambda line: print(line, flush=True))
        for line in ratios(rows):
            print(line)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    if opts.memory:
        print(HEAD, flush=True)
        size = (opts.datagram or [1452])[0]
        row = memory(opts.memory, size, opts.sink or "/dev/null",
                     timeout=max(opts.timeout, 3600.0))
        print(format_row(row))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0 if not row.note else 1
    sizes = opts.datagram or [1452, 65000]
    gsos = {"on": [True], "off": [False], "both": [True, False]}[opts.gso]
    print(f"{'datagram':>8} {'gso/gro':>7} {'MiB':>6} {'MB/s':>8} {'send CPU s/GB':>13} "
          f"{'recv CPU s/GB':>13} {'lost MB':>8} {'rtt ms':>7} {'RSS MB s/r':>11}")
    for size in sizes:
        for gso in gsos:
            mb = opts.mb or (512 if size < 10000 else 2048)
            res = ours(mb, size, gso=gso, policy=opts.policy, target=opts.target,
                       sink=opts.sink, timeout=opts.timeout)
            s, r = res["sender"], res["receiver"]
            gb = s["bytes"] / 1e9
            print(f"{size:>8} {('on' if gso else 'off'):>7} {mb:>6} "
                  f"{s['bytes'] / s['wall'] / 1e6:>8.1f} {s['cpu'] / gb:>13.2f} "
                  f"{r['cpu'] / max(r['bytes'] / 1e9, 1e-9):>13.2f} {s['lost'] / 1e6:>8.1f} "
                  f"{s['rtt_ms']:>7.2f} {s['rss_mb']:>5.0f}/{r['rss_mb']:<5.0f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

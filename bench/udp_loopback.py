"""UDP path on loopback: MB/s and CPU seconds per GB for sender and receiver.

Two processes (one per side, so each may have a core), each with its own event loop
(uvloop when installed), endpoint and ``UdpConnection``; every datagram is sealed with
AES-256-GCM. The sender queues synthetic pieces from one 1 MiB buffer as the core asks
(``SendReady``) and re-queues lost ones; it closes once every byte is acknowledged.
For each datagram size and GSO/GRO setting it prints one line::

    python -m bench.udp_loopback                       # 1452 and 65000 bytes, GSO on and off
    python -m bench.udp_loopback --mb 256 --datagram 1452 --gso on

MB/s is piece bytes over the sender's wall time (first send to last acknowledgement);
CPU s/GB is user+system time of each process per 10**9 piece bytes. The machine's load
average is printed with the results: figures from a shared machine are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
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

    def on_event(c: UdpConnection, ev: Event) -> None:
        if isinstance(ev, PiecesReceived):
            if not got[0]:
                got[1], got[2] = time.perf_counter(), _cpu()
            got[0] += sum(len(p[3]) for p in ev.pieces)
        elif isinstance(ev, Closed) and not done.done():
            done.set_result(None)

    ep.add(conn, on_event)
    try:
        await asyncio.wait_for(done, args["timeout"])
    except TimeoutError:
        pass
    pipe.send({"bytes": got[0], "wall": time.perf_counter() - got[1], "cpu": _cpu() - got[2],
               "drops": sum(conn.stats().drops.values()), "features": ep.features,
               "recv_calls": ep.recv_calls})
    ep.close()


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
               "features": ep.features})
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=0, help="MiB per run (default 512 at 1452 B, "
                   "2048 at 65000 B)")
    p.add_argument("--datagram", type=int, action="append", help="datagram sizes (repeat)")
    p.add_argument("--gso", choices=["on", "off", "both"], default="both")
    p.add_argument("--policy", default="fair")
    p.add_argument("--target", type=float, default=None, help="target rate, bits/s")
    p.add_argument("--timeout", type=float, default=120.0)
    opts = p.parse_args(argv)
    sizes = opts.datagram or [1452, 65000]
    gsos = {"on": [True], "off": [False], "both": [True, False]}[opts.gso]
    secret = os.urandom(32)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'datagram':>8} {'gso/gro':>7} {'MiB':>6} {'MB/s':>8} {'send CPU s/GB':>13} "
          f"{'recv CPU s/GB':>13} {'lost MB':>8} {'rtt ms':>7}")
    for size in sizes:
        for gso in gsos:
            mb = opts.mb or (512 if size < 10000 else 2048)
            args = {"datagram": size, "gso": gso, "mb": mb, "policy": opts.policy,
                    "target": opts.target, "secret": secret, "timeout": opts.timeout}
            res = run_one(args)
            s, r = res["sender"], res["receiver"]
            gb = s["bytes"] / 1e9
            print(f"{size:>8} {('on' if gso else 'off'):>7} {mb:>6} "
                  f"{s['bytes'] / s['wall'] / 1e6:>8.1f} {s['cpu'] / gb:>13.2f} "
                  f"{r['cpu'] / max(r['bytes'] / 1e9, 1e-9):>13.2f} {s['lost'] / 1e6:>8.1f} "
                  f"{s['rtt_ms']:>7.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hot loop of one link direction: read a TUN, shape, write the other TUN when due.

One process per direction (forked by the forwarder) so the two directions run on both cores
and a burst of ACKs never delays data packets.  The loop is a plain ``select`` loop rather than
asyncio: ``select`` takes a microsecond timeout (epoll and uvloop round to milliseconds), and
``time.monotonic()`` is the clock everywhere.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import socket
import time
from typing import Any

from bench.netem.shaper import DirectionParams, Shaper

READ_BATCH = 64  # packets read per wake-up; bounded so due packets are not held back long
SPIN_S = 50e-6  # closer than this to a due time, poll instead of sleeping (timer slack)
IDLE_TIMEOUT_S = 0.5  # wake up at least this often to notice a dead parent or the deadline
MAX_PACKET = 65536
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29


def _prctl(option: int, value: int) -> None:
    """Best-effort prctl; the loop still works (less precisely) if it fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except OSError:
        pass


RT_PRIORITY = 10


def boost(sched: str) -> str:
    """Raise this worker's scheduling priority; returns the policy actually in effect.

    The kernel's netem runs in softirq context, ahead of every process; a user-space emulator
    sharing two cores with busy peers must likewise preempt them, or its packets leave late.
    SCHED_FIFO does that; the kernel's RT throttling (95 % by default) keeps a saturated worker
    from locking the machine.  Falls back to a strong nice value.
    """
    if sched == "fifo":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
            return "fifo"
        except (OSError, AttributeError):
            pass
    if sched in ("fifo", "nice"):
        try:
            os.nice(-15)
            return "nice-15"
        except OSError:
            pass
    return "normal"


MCL_CURRENT, MCL_FUTURE = 1, 2


def _mlockall() -> None:
    """Keep the worker's memory resident, as real-time processes do (best effort).

    Together with glibc's trim/mmap thresholds raised by the link (environment), freed packet
    buffers stay in the process instead of going back to the kernel, where a VM may hand them
    to the host and fault them back in later, stalling the loop.
    """
    try:
        ctypes.CDLL(None, use_errno=True).mlockall(MCL_CURRENT | MCL_FUTURE)
    except OSError:
        pass


def _handle(shaper: Shaper, msg: dict[str, Any]) -> dict[str, Any]:
    """Apply one control message from the forwarder and build the reply."""
    cmd = msg.get("cmd")
    if cmd == "set":
        shaper.set_params(DirectionParams(**msg["params"]))
        return {"ok": True}
    if cmd == "counters":
        return {"ok": True, "counters": shaper.window().summary(),
                "total": shaper.total().summary(), "pending": shaper.pending()}
    if cmd == "reset":
        shaper.reset_counters()
        return {"ok": True}
    if cmd == "stop":
        return {"ok": True, "stop": True, "counters": shaper.total().summary()}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def run_worker(
    in_fd: int, out_fd: int, ctl: socket.socket, shaper: Shaper, max_seconds: float,
    sched: str = "fifo",
) -> None:
    """Forward packets from *in_fd* to *out_fd* until told to stop, orphaned or out of time."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    policy = boost(sched)
    _prctl(PR_SET_TIMERSLACK, 1)  # 1 ns slack: sleeps end when asked, not up to 50 us later
    _mlockall()
    # The hot loop creates no reference cycles; a gen-2 collection over a delay line holding
    # tens of thousands of (due, packet) tuples would stall forwarding for milliseconds.
    gc.collect()
    gc.freeze()
    gc.disable()
    parent = os.getppid()
    deadline = time.monotonic() + max_seconds
    ctl.setblocking(False)
    ctl_fd = ctl.fileno()
    rlist = [in_fd, ctl_fd]
    mono = time.monotonic
    read = os.read
    sel = select.select
    ingest = shaper.ingest
    emit = shaper.emit
    next_due = shaper.next_due

    def write(pkt: bytes) -> int:
        return os.write(out_fd, pkt)

    buf = b""
    loops = 0
    while True:
        loops += 1
        if loops & 0x3FF == 0 and mono() > deadline:
            return
        emit(mono, write)
        due = next_due()
        if due is None:
            timeout = IDLE_TIMEOUT_S
        else:
            timeout = due - mono()
            if timeout < SPIN_S:
                timeout = 0.0
        ready, _, _ = sel(rlist, [], [], timeout)
        if not ready:
            if due is None and (os.getppid() != parent or mono() > deadline):
                return
            continue
        if in_fd in ready:
            pkts = []
            for _ in range(READ_BATCH):
                try:
                    pkts.append(read(in_fd, MAX_PACKET))
                except BlockingIOError:
                    break
            if pkts:
                ingest(pkts, mono())
        if ctl_fd in ready:
            try:
                chunk = ctl.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = _handle(shaper, json.loads(line))
                reply["sched"] = policy
                ctl.setblocking(True)
                ctl.sendall(json.dumps(reply).encode() + b"\n")
                ctl.setblocking(False)
                if reply.get("stop"):
                    return

"""The emulator process: owns both TUN devices, forks one worker per direction, serves control.

Run as ``python -m bench.netem.forwarder`` by :class:`bench.netem.link.EmulatedLink`; it is a
separate process so the shaping loops never compete with the benchmark driver for the GIL.
Lifetime is tied to the driver (PDEATHSIG) and bounded by ``--max-seconds``; when it exits the
TUN fds close and the kernel deletes both devices, so nothing is left behind.

Control channel: a UNIX stream socket in the run directory taking one JSON object per line:
``{"cmd": "set", "dir": "both"|"ab"|"ba", "rate_mbit": .., "loss_pct": .., "rtt_ms": ..}``,
``{"cmd": "counters"}``, ``{"cmd": "reset"}``, ``{"cmd": "stop"}``.  Every request gets one
JSON reply line.  "ab" is the A->B direction (packets sent by namespace A).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.netem.config import LinkConfig
from bench.netem.shaper import Shaper
from bench.netem.tun import move_to_netns, open_tun
from bench.netem.worker import PR_SET_PDEATHSIG, _prctl, run_worker

DIRECTIONS = ("ab", "ba")
WORKER_REPLY_TIMEOUT_S = 5.0


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of *pid* from /proc (all threads), 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Forwarder:
    """Parent side: worker processes, their control pipes and the current configuration."""

    def __init__(self, configs: dict[str, LinkConfig], seed: int, sched: str = "fifo") -> None:
        self.configs = configs
        self.sched = sched
        self.seed = seed
        self.pipes: dict[str, socket.socket] = {}
        self.pids: dict[str, int] = {}
        self.final: dict[str, Any] = {}

    def spawn(self, fds: dict[str, tuple[int, int]], max_seconds: float) -> None:
        """Fork one worker per direction; each reads one TUN and writes the other."""
        for i, d in enumerate(DIRECTIONS):
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    parent_end.close()
                    for other in self.pipes.values():
                        other.close()
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides
                    shaper = Shaper(self.configs[d].to_params(), seed=self.seed * 2 + i)
                    run_worker(fds[d][0], fds[d][1], child_end, shaper, max_seconds,
                               self.sched)
                except BaseException:  # noqa: BLE001 - a worker must never return into the parent
                    code = 1
                finally:
                    os._exit(code)
            child_end.close()
            parent_end.settimeout(WORKER_REPLY_TIMEOUT_S)
            self.pipes[d] = parent_end
            self.pids[d] = pid

    def ask(self, d: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request to a worker and wait for its one-line reply."""
        sock = self.pipes[d]
        sock.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"worker {d} died")
            buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Serve one control request."""
        cmd = msg.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "set":
            which = msg.get("dir", "both")
            targets = DIRECTIONS if which == "both" else (which,)
            changes = {k: v for k, v in msg.items() if k not in ("cmd", "dir")}
            new = {d: self.configs[d].updated(changes) for d in targets}
            params = {d: c.to_params() for d, c in new.items()}  # validate before applying
            for d in targets:
                self.ask(d, {"cmd": "set", "params": params[d].to_dict()})
                self.configs[d] = new[d]
            return {"ok": True, "config": {d: c.to_dict() for d, c in self.configs.items()}}
        if cmd == "counters":
            out: dict[str, Any] = {"ok": True}
            for d in DIRECTIONS:
                r = self.ask(d, {"cmd": "counters"})
                out[d] = r["counters"] | {"pending": r["pending"]}
                out.setdefault("total", {})[d] = r["total"]
                out["sched"] = r.get("sched")
            out["cpu_s"] = self.cpu_seconds()
            out["t"] = time.monotonic()
            out["config"] = {d: c.to_dict() for d, c in self.configs.items()}
            return out
        if cmd == "reset":
            for d in DIRECTIONS:
                self.ask(d, {"cmd": "reset"})
            return {"ok": True}
        if cmd == "stop":
            self.stop()
            return {"ok": True, "stop": True} | self.final
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the forwarder and each worker."""
        cpu = {d: proc_cpu_seconds(pid) for d, pid in self.pids.items()}
        cpu["control"] = proc_cpu_seconds(os.getpid())
        return cpu

    def stop(self) -> None:
        """Stop the workers, keeping their last counters for the reply."""
        if self.final:
            return
        self.final = {"cpu_s": self.cpu_seconds()}
        for d in DIRECTIONS:
            try:
                self.final[d] = self.ask(d, {"cmd": "stop"})["counters"]
            except (OSError, ConnectionError, ValueError):
                self.final[d] = {}
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

    def workers_alive(self) -> bool:
        """True while both workers run (a dead worker means the link is broken)."""
        for pid in self.pids.values():
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return False
            if done:
                return False
        return True


def serve(fwd: Forwarder, sock_path: Path, deadline: float, parent: int) -> None:
    """Control loop: JSON lines on a UNIX socket until stop, orphaned, deadline or a dead worker."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(8)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    bufs: dict[socket.socket, bytes] = {}
    try:
        while time.monotonic() < deadline and os.getppid() == parent and fwd.workers_alive():
            for key, _ in sel.select(timeout=0.5):
                if key.fileobj is srv:
                    conn, _ = srv.accept()
                    conn.settimeout(5.0)
                    sel.register(conn, selectors.EVENT_READ)
                    bufs[conn] = b""
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(conn)
                    conn.close()
                    bufs.pop(conn, None)
                    continue
                bufs[conn] += chunk
                while b"\n" in bufs[conn]:
                    line, bufs[conn] = bufs[conn].split(b"\n", 1)
                    try:
                        reply = fwd.handle(json.loads(line))
                    except (ValueError, TypeError, KeyError, OSError) as exc:
                        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                    if reply.get("stop"):
                        return
    finally:
        fwd.stop()
        srv.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: create devices, fork workers, report readiness on stdout, serve control."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--ns-a", required=True)
    ap.add_argument("--ns-b", required=True)
    ap.add_argument("--dev-a", required=True, help="unique root-namespace name for A's TUN")
    ap.add_argument("--dev-b", required=True)
    ap.add_argument("--config", required=True, help='JSON {"ab": {...}, "ba": {...}}')
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=6 * 3600)
    ap.add_argument("--sched", default="fifo", choices=["fifo", "nice", "normal"])
    args = ap.parse_args(argv)

    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return 1
    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds through serve()'s finally: workers stopped, fds closed

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops us
    raw = json.loads(args.config)
    configs = {d: LinkConfig(**raw[d]) for d in DIRECTIONS}
    fd_a = open_tun(args.dev_a)
    fd_b = open_tun(args.dev_b)
    move_to_netns(args.dev_a, args.ns_a, "tunA")
    move_to_netns(args.dev_b, args.ns_b, "tunB")
    fwd = Forwarder(configs, args.seed, args.sched)
    fwd.spawn({"ab": (fd_a, fd_b), "ba": (fd_b, fd_a)}, args.max_seconds)
    (args.run_dir / "forwarder.pid").write_text(f"{os.getpid()}\n")
    sock_path = args.run_dir / "ctl.sock"
    print(json.dumps({"ready": True, "ctl": str(sock_path), "workers": fwd.pids}), flush=True)
    try:
        serve(fwd, sock_path, time.monotonic() + args.max_seconds, parent)
    finally:
        fwd.stop()
        os.close(fd_a)
        os.close(fd_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``EmulatedLink``: two namespaces joined by the user-space WAN emulator.

Usage::

    with EmulatedLink(rate_mbit=100, rtt_ms=100, loss_pct=1.0, seed=1) as link:
        srv = link.run_in_b(["iperf3", "-s", "-1"])
        cli = link.run_in_a(["iperf3", "-c", link.b_ip, "-t", "10"])
        link.set(loss_pct=2.0)          # live, while the transfer runs
        link.block_udp(33001)           # firewall switch in namespace B
        print(link.counters())

Topology: namespace A has ``tunA`` 10.77.0.1 with a /32 peer route to 10.77.0.2, namespace B
has ``tunB`` 10.77.0.2 with the mirror route.  Both ends sit in one /24, so the forwarder moves
packets between the TUNs untouched (no address rewriting, no checksum fix-ups).

Teardown (context exit, ``close()``, atexit, SIGTERM/SIGHUP) kills every process in both
namespaces, stops the forwarder (which makes the kernel delete the TUNs), deletes the namespaces
(and with them the nft table) and removes the run directory.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from bench.netem import netns
from bench.netem.config import LinkConfig
from bench.netem.control import ControlError, request

REPO_ROOT = Path(__file__).resolve().parents[2]
A_IP = "10.77.0.1"
B_IP = "10.77.0.2"
READY_TIMEOUT_S = 20.0
MTU = 1500

_LIVE: set[BaseLink] = set()
_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _cleanup_live() -> None:
    """Tear down every link still open (atexit and fatal signals)."""
    with _LOCK:
        links = list(_LIVE)
    for link in links:
        try:
            link.close()
        except Exception as exc:  # noqa: BLE001 - keep tearing down the others
            print(f"bench.netem: teardown of {link.suffix} failed: {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``with`` blocks and finally clauses run."""
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    """Once per process: atexit hook plus SIGTERM/SIGHUP handlers (only where still default)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_cleanup_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


class BaseLink:
    """Namespaces, run directory, peer processes, firewall and teardown shared by backends."""

    a_ip = A_IP
    b_ip = B_IP

    def __init__(
        self,
        rate_mbit: float = 0.0,
        rtt_ms: float = 0.0,
        loss_pct: float = 0.0,
        jitter_ms: float = 0.0,
        queue_ms: float | None = None,
        reorder: bool = False,
        seed: int = 1,
        tcp_buffers: str = "typical",
    ) -> None:
        cfg = LinkConfig(rate_mbit, rtt_ms, loss_pct, jitter_ms, queue_ms, reorder)
        cfg.to_params()  # validate early, before anything is created
        if tcp_buffers not in netns.TCP_PROFILES:
            raise ValueError(f"tcp_buffers must be one of {sorted(netns.TCP_PROFILES)}")
        self.tcp_buffers = tcp_buffers
        self.configs: dict[str, LinkConfig] = {"ab": cfg, "ba": cfg}
        self.seed = seed
        self.suffix = f"{os.getpid() & 0xFFFF:04x}{secrets.token_hex(2)}"
        self.ns_a = f"fbA-{self.suffix}"
        self.ns_b = f"fbB-{self.suffix}"
        self.run_dir = netns.RUN_BASE / self.suffix
        self.procs: list[subprocess.Popen[Any]] = []
        self.final_counters: dict[str, Any] = {}
        self._nft_ready = False
        self._open = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Create namespaces and the data path; on any failure undo what was done."""
        if os.geteuid() != 0:
            raise PermissionError("EmulatedLink needs root (network namespaces, TUN devices)")
        _install_handlers()
        with _LOCK:
            _LIVE.add(self)
        self._open = True
        try:
            self.run_dir.mkdir(parents=True, exist_ok=False)
            (self.run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
            netns.create_ns(self.ns_a, self.tcp_buffers)
            netns.create_ns(self.ns_b, self.tcp_buffers)
            self._start_datapath()
        except BaseException:
            self.close()
            raise

    def _start_datapath(self) -> None:
        raise NotImplementedError

    def _stop_datapath(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        """Tear everything down; safe to call twice; returns the final emulator counters."""
        if not self._open:
            return self.final_counters
        self._open = False
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for ns in (self.ns_a, self.ns_b):
            netns.kill_pids(netns.ns_pids(ns))
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)
        try:
            self.final_counters = self._stop_datapath()
        except Exception as exc:  # noqa: BLE001 - teardown must continue
            self.final_counters = {"error": str(exc)}
        for ns in (self.ns_a, self.ns_b):
            netns.delete_ns(ns)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with _LOCK:
            _LIVE.discard(self)
        return self.final_counters

    # -- peers -----------------------------------------------------------------------------
    def run_in(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start *argv* inside *ns*; the process is killed at teardown if still running."""
        p: subprocess.Popen[Any] = subprocess.Popen(netns.ns_exec(ns, argv), **popen_kw)
        self.procs.append(p)
        return p

    def run_in_a(self, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in namespace A (client side by convention, address ``a_ip``)."""
        return self.run_in(self.ns_a, argv, **popen_kw)

    def run_in_b(self, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in namespace B (server side by convention, address ``b_ip``)."""
        return self.run_in(self.ns_b, argv, **popen_kw)

    def exec_argv(self, side: str, argv: Sequence[str]) -> list[str]:
        """argv running *argv* in side "a" or "b", for callers that manage the process."""
        return netns.ns_exec(self.ns_a if side == "a" else self.ns_b, argv)

    # -- firewall --------------------------------------------------------------------------
    def block_udp(self, port: int) -> None:
        """Drop UDP to/from *port* in namespace B (simulates a firewall closing the fast path)."""
        if not self._nft_ready:
            netns.nft_setup(self.ns_b)
            self._nft_ready = True
        netns.nft_port(self.ns_b, port, block=True)

    def unblock_udp(self, port: int) -> None:
        """Undo :meth:`block_udp`."""
        if self._nft_ready:
            netns.nft_port(self.ns_b, port, block=False)

    def blocked_udp(self) -> list[int]:
        """Ports currently blocked."""
        return netns.nft_blocked(self.ns_b) if self._nft_ready else []

    # -- measurements ----------------------------------------------------------------------
    def tcp_counters(self, side: str) -> dict[str, int]:
        """Kernel SNMP counters of namespace *side* ("a"/"b"), e.g. ``Tcp.RetransSegs``."""
        return netns.ns_snmp(self.ns_a if side == "a" else self.ns_b)

    def set(self, direction: str = "both", **changes: Any) -> dict[str, Any]:
        """Change rate_mbit / loss_pct / rtt_ms / jitter_ms / queue_ms / reorder live."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """Per-direction forwarding counters."""
        raise NotImplementedError

    def reset_counters(self) -> None:
        """Start a new counting window (call before each measured peer run)."""
        raise NotImplementedError


class EmulatedLink(BaseLink):
    """User-space emulator: TUN in each namespace, forwarder process in the root namespace."""

    backend = "tun"

    def __init__(
        self, *args: Any, max_seconds: float = 6 * 3600, sched: str = "fifo", **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.max_seconds = max_seconds
        self.sched = sched
        self.forwarder: subprocess.Popen[str] | None = None
        self.ctl_path = self.run_dir / "ctl.sock"

    def _start_datapath(self) -> None:
        cfg = json.dumps({d: c.to_dict() for d, c in self.configs.items()})
        argv = [
            sys.executable, "-m", "bench.netem.forwarder",
            "--run-dir", str(self.run_dir), "--ns-a", self.ns_a, "--ns-b", self.ns_b,
            "--dev-a", f"fbta{self.suffix}", "--dev-b", f"fbtb{self.suffix}",
            "--config", cfg, "--seed", str(self.seed), "--max-seconds", str(self.max_seconds),
            "--sched", self.sched,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        # glibc: never give freed packet buffers back to the kernel (see worker._mlockall)
        env["MALLOC_TRIM_THRESHOLD_"] = env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 30)
        log = open(self.run_dir / "forwarder.log", "w")  # noqa: SIM115 - lives with the process
        self.forwarder = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=str(REPO_ROOT)
        )
        log.close()
        line = self._read_ready()
        if not line.get("ready"):
            raise RuntimeError(f"forwarder failed: {line}")
        for ns, dev, local, peer in (
            (self.ns_a, "tunA", A_IP, B_IP),
            (self.ns_b, "tunB", B_IP, A_IP),
        ):
            netns.run(["ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "txqueuelen", "1000"])
            netns.run(["ip", "-n", ns, "addr", "add", f"{local}/32", "peer", f"{peer}/32",
                       "dev", dev])
            netns.run(["ip", "-n", ns, "link", "set", dev, "up"])

    def _read_ready(self) -> dict[str, Any]:
        """Wait (bounded) for the forwarder's JSON ready line."""
        assert self.forwarder is not None and self.forwarder.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.forwarder.stdout, selectors.EVENT_READ)
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            if sel.select(timeout=0.2):
                line = self.forwarder.stdout.readline()
                if line:
                    result: dict[str, Any] = json.loads(line)
                    return result
                break
            if self.forwarder.poll() is not None:
                break
        err = (self.run_dir / "forwarder.log").read_text()[-2000:]
        raise RuntimeError(f"forwarder did not become ready: {err}")

    def _stop_datapath(self) -> dict[str, Any]:
        final: dict[str, Any] = {}
        if self.forwarder is None:
            return final
        if self.forwarder.poll() is None:
            try:
                final = request(self.ctl_path, {"cmd": "stop"}, timeout=5)
            except (ControlError, ValueError):
                pass
            try:
                self.forwarder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait(timeout=5)
        if self.forwarder.stdout:
            self.forwarder.stdout.close()
        final.pop("ok", None)
        final.pop("stop", None)
        return final

    def set(self, direction: str = "both", **changes: Any) -> dict[str, Any]:
        """Change settings live, e.g. ``link.set(rate_mbit=50, loss_pct=0.5, rtt_ms=200)``."""
        changes = {k: v for k, v in changes.items() if v is not None}
        reply = request(self.ctl_path, {"cmd": "set", "dir": direction, **changes})
        self.configs = {d: LinkConfig(**c) for d, c in reply["config"].items()}
        return reply["config"]  # type: ignore[no-any-return]

    def counters(self) -> dict[str, Any]:
        """Per-direction counters (packets/bytes forwarded, drops, lateness) and CPU seconds."""
        reply = request(self.ctl_path, {"cmd": "counters"})
        reply.pop("ok", None)
        return reply

    def reset_counters(self) -> None:
        """Zero the counters (new window per measured peer)."""
        request(self.ctl_path, {"cmd": "reset"})


def make_link(backend: str = "tun", **kw: Any) -> BaseLink:
    """Link with the requested backend: "tun" (user space, always) or "netem" (kernel tc)."""
    if backend == "tun":
        return EmulatedLink(**kw)
    if backend == "netem":
        from bench.netem.kernel import NetemLink

        return NetemLink(**kw)
    raise ValueError(f"unknown backend {backend!r}")

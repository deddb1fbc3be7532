"""Two network namespaces joined by a veth pair, and nftables rules that cut them.

Tests that cut the network for real (issue 13, section 3) run the daemon in one
namespace (``side="daemon"``, address ``DAEMON_IP``) and the client in the
other (``side="client"``, ``CLIENT_IP``); ``Net.block_tcp``/``unblock_tcp`` and
``block_udp``/``unblock_udp`` add and remove nftables rules in the client's
namespace (output and input hooks, so both directions are cut). A blocked TCP
port either drops its packets (a firewall that says nothing: connects time out)
or rejects them with a TCP reset (``reject=True``: connects are refused at once).

Everything is created by ``Net.create`` and removed by ``Net.close`` (or the
context manager): the namespaces (every process inside is killed first), the
veth pair and the nftables tables, which live in the namespaces. Names carry
``PREFIX`` plus the test process's pid and a counter, so parallel runs never
clash. ``skip_reason()`` says why such tests cannot run here (not root, no
``ip`` or ``nft``). A small copy of ``bench/netem/netns.py``'s plumbing: tests
do not import bench.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "fbt"
DAEMON_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"
TABLE = "fbtest"
CMD_TIMEOUT = 15.0
_counter = itertools.count()


def skip_reason() -> str | None:
    """Why namespace tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns, nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"network-namespace tests need the {tool!r} command"
    return None


def run(argv: Sequence[str], check: bool = True, stdin: str | None = None) -> str:
    """Run a short admin command; ``RuntimeError`` with its stderr when it fails."""
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                       input=stdin)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def _kill_inside(ns: str) -> None:
    out = run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in out.split() if x.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 2.0
        while pids and time.monotonic() < end:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Net:
    """A daemon namespace and a client namespace on one veth link (``DAEMON_IP``/``CLIENT_IP``)."""

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{os.getpid()}{n}"
        self.daemon_ns = f"{PREFIX}{tag}d"
        self.client_ns = f"{PREFIX}{tag}c"
        # interface names: at most 15 characters, unique in the root namespace while created
        self._veth = (f"fbv{tag}d"[:15], f"fbv{tag}c"[:15])
        self._made: list[str] = []

    def create(self) -> Net:
        try:
            for ns in (self.daemon_ns, self.client_ns):
                run(["ip", "netns", "add", ns])
                self._made.append(ns)
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
            a, b = self._veth
            run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            run(["ip", "link", "set", a, "netns", self.daemon_ns])
            run(["ip", "link", "set", b, "netns", self.client_ns])
            for ns, dev, ip in ((self.daemon_ns, a, DAEMON_IP), (self.client_ns, b, CLIENT_IP)):
                run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
                run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(self.exec("client", "nft", "-f", "-"), stdin=f"""
table inet {TABLE} {{
  set tcp_drop {{ type inet_service; }}
  set tcp_reject {{ type inet_service; }}
  set udp_drop {{ type inet_service; }}
  chain output {{ type filter hook output priority 0; policy accept;
    ip daddr {DAEMON_IP} tcp dport @tcp_drop drop
    ip daddr {DAEMON_IP} tcp dport @tcp_reject reject with tcp reset
    ip daddr {DAEMON_IP} udp dport @udp_drop drop
  }}
  chain input {{ type filter hook input priority 0; policy accept;
    ip saddr {DAEMON_IP} tcp sport @tcp_drop drop
    ip saddr {DAEMON_IP} udp sport @udp_drop drop
  }}
}}
""")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process in both namespaces and remove them (veth and rules go too)."""
        for ns in self._made:
            _kill_inside(ns)
            run(["ip", "netns", "del", ns], check=False)
        self._made.clear()

    def __enter__(self) -> Net:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running things ------------------------------------------------------------------
    def exec(self, side: str, *argv: str) -> list[str]:
        """``argv`` run inside the ``"daemon"`` or ``"client"`` namespace."""
        ns = self.daemon_ns if side == "daemon" else self.client_ns
        return ["ip", "netns", "exec", ns, *argv]

    # -- cutting -------------------------------------------------------------------------
    def _set(self, name: str, verb: str, ports: Sequence[int]) -> None:
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"bad port {port}")
        elems = ", ".join(str(p) for p in ports)
        run(self.exec("client", "nft", verb, "element", "inet", TABLE, name, f"{{ {elems} }}"))

    def block_tcp(self, *ports: int, reject: bool = False) -> None:
        """Cut TCP to the daemon's ``ports``: silently dropped, or refused (TCP reset)."""
        self._set("tcp_reject" if reject else "tcp_drop", "add", ports)

    def unblock_tcp(self, *ports: int) -> None:
        for name in ("tcp_drop", "tcp_reject"):
            for port in ports:
                if port in self.blocked(name):
                    self._set(name, "delete", [port])

    def block_udp(self, *ports: int) -> None:
        self._set("udp_drop", "add", ports)

    def unblock_udp(self, *ports: int) -> None:
        present = self.blocked("udp_drop")
        gone = [p for p in ports if p in present]
        if gone:
            self._set("udp_drop", "delete", gone)

    def police_udp(self, port: int, pct: int) -> None:
        """Drop ``pct`` % of UDP to and from the daemon's ``port``, at random (``numgen``):
        a firewall that polices UDP to a trickle. Gone with the namespace."""
        if not (0 < port < 65536 and 0 < pct <= 100):
            raise ValueError(f"bad port {port} or percentage {pct}")
        for chain, match in (("output", f"ip daddr {DAEMON_IP} udp dport {port}"),
                             ("input", f"ip saddr {DAEMON_IP} udp sport {port}")):
            run(self.exec("client", "nft", "insert", "rule", "inet", TABLE, chain,
                          *match.split(), "numgen", "random", "mod", "100", "<", str(pct),
                          "drop"))

    def drop_udp_larger(self, port: int, size: int) -> None:
        """Drop the client's UDP datagrams to the daemon's ``port`` whose UDP payload is
        over ``size`` bytes: a link with a smaller MTU further on whose ICMP never comes
        back (a black hole for large datagrams). Gone with the namespace. nftables sees
        a UDP GSO batch whole (before it is cut into datagrams), so the rule drops every
        batch too: use it where only single datagrams matter (probes)."""
        if not (0 < port < 65536 and 0 < size < 65536):
            raise ValueError(f"bad port {port} or size {size}")
        run(self.exec("client", "nft", "insert", "rule", "inet", TABLE, "output", "ip", "daddr",
                      DAEMON_IP, "udp", "dport", str(port), "udp", "length", ">", str(size + 8),
                      "drop"))

    def blocked(self, name: str) -> list[int]:
        """Ports in one of the sets (``tcp_drop``, ``tcp_reject``, ``udp_drop``)."""
        import json

        out = run(self.exec("client", "nft", "-j", "list", "set", "inet", TABLE, name))
        for item in json.loads(out).get("nftables", []):
            if "set" in item:
                return sorted(int(e) for e in item["set"].get("elem", []))
        return []

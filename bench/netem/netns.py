"""Network-namespace, sysctl and nftables plumbing shared by the link backends and cleanup.

All names carry the ``fbA-``/``fbB-`` prefix plus a per-run suffix: parallel runs never clash,
and ``python -m bench.netem cleanup`` can find leftovers of crashed runs by prefix alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

NS_PREFIXES = ("fbA-", "fbB-")
RUN_BASE = Path(os.environ.get("FB_NETEM_RUN_BASE", "/tmp/fbnetem"))
NFT_TABLE = "fbnetem"
CMD_TIMEOUT_S = 15

# Applied inside both namespaces; IPv4 only keeps router solicitations / MLD chatter out of the
# emulator's counters.  (net.core.* buffer limits are not settable per namespace.)
BASE_SYSCTLS = {
    "net.ipv4.tcp_no_metrics_save": "1",  # no cached ssthresh leaking from one peer run to the next
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}

# TCP buffer profiles, pinned so results do not depend on the host's sysctls (a new namespace
# copies them from the host).  "typical" matches common distro hosts and the machines behind
# the reference figures in bench/README.md: the 4 MiB send-buffer cap limits a single TCP
# stream on long lossy paths (BBR at 200 ms / 2 %: ~48 Mbit/s).  "wan" lifts both caps to
# 64 MiB (same path: ~78 Mbit/s).  "inherit" leaves the host's values.
TCP_PROFILES: dict[str, dict[str, str]] = {
    "typical": {
        "net.ipv4.tcp_rmem": "4096 131072 33554432",
        "net.ipv4.tcp_wmem": "4096 16384 4194304",
    },
    "wan": {
        "net.ipv4.tcp_rmem": "4096 131072 67108864",
        "net.ipv4.tcp_wmem": "4096 16384 67108864",
    },
    "inherit": {},
}


def run(argv: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT_S) -> str:
    """Run a short admin command and return its stdout (stderr included in the error)."""
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs *argv* inside namespace *ns* (ip netns exec replaces itself via exec)."""
    return ["ip", "netns", "exec", ns, *argv]


def create_ns(name: str, tcp_buffers: str = "typical") -> None:
    """Create a namespace with loopback up and the pinned sysctls applied."""
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    settings = BASE_SYSCTLS | TCP_PROFILES[tcp_buffers]
    run(ns_exec(name, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]))


def ns_pids(name: str) -> list[int]:
    """Processes whose network namespace is *name*."""
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def kill_pids(pids: Sequence[int], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after *grace_s* (bounded wait)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def delete_ns(name: str) -> None:
    """Kill everything inside *name*, then remove it (its devices and nft tables go with it)."""
    kill_pids(ns_pids(name))
    run(["ip", "netns", "del", name], check=False)


def list_ns(prefixes: Sequence[str] = NS_PREFIXES) -> list[str]:
    """Namespaces whose name starts with one of *prefixes*."""
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(tuple(prefixes))]


def nft_setup(ns: str) -> None:
    """Create our own table in *ns*: a port set and input/output rules dropping matching UDP."""
    script = f"""
table inet {NFT_TABLE} {{
  set blocked_udp {{ type inet_service; }}
  chain input {{ type filter hook input priority 0; policy accept;
    udp dport @blocked_udp drop; udp sport @blocked_udp drop; }}
  chain output {{ type filter hook output priority 0; policy accept;
    udp dport @blocked_udp drop; udp sport @blocked_udp drop; }}
}}
"""
    subprocess.run(
        ns_exec(ns, ["nft", "-f", "-"]), input=script, text=True, check=True,
        capture_output=True, timeout=CMD_TIMEOUT_S,
    )


def nft_port(ns: str, port: int, block: bool) -> None:
    """Add or remove *port* in the blocked-UDP set of namespace *ns*."""
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    verb = "add" if block else "delete"
    run(ns_exec(ns, ["nft", verb, "element", "inet", NFT_TABLE, "blocked_udp", f"{{ {port} }}"]))


def nft_blocked(ns: str) -> list[int]:
    """Ports currently in the blocked set (for tests and reports)."""
    out = run(ns_exec(ns, ["nft", "-j", "list", "set", "inet", NFT_TABLE, "blocked_udp"]))
    data = json.loads(out)
    for item in data.get("nftables", []):
        if "set" in item:
            return sorted(int(e) for e in item["set"].get("elem", []))
    return []


def ns_snmp(ns: str) -> dict[str, int]:
    """Tcp/TcpExt/Udp counters of namespace *ns* (e.g. RetransSegs for bytes re-sent)."""
    out = run(ns_exec(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"]), check=False)
    lines = out.splitlines()
    counters: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, names = head.split(":", 1)
        _, values = vals.split(":", 1)
        for k, v in zip(names.split(), values.split(), strict=False):
            try:
                counters[f"{proto}.{k}"] = int(v)
            except ValueError:
                pass
    return counters

"""Optional backend: a veth pair with the kernel's ``tc qdisc netem`` where that module exists.

Useful to cross-check the user-space emulator on machines that have sch_netem; on machines
without it :func:`netem_available` says so and callers skip this backend.  Same namespaces,
addresses, firewall and teardown as :class:`bench.netem.link.EmulatedLink`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from bench.netem import netns
from bench.netem.config import LinkConfig
from bench.netem.link import A_IP, B_IP, MTU, BaseLink


def netem_available() -> bool:
    """Probe once: can a netem qdisc be attached to a veth in a scratch namespace?"""
    probe = f"fbA-probe{secrets.token_hex(2)}"
    try:
        netns.run(["ip", "netns", "add", probe])
        netns.run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        netns.run(["tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"])
        return True
    except (RuntimeError, OSError):
        return False
    finally:
        netns.run(["ip", "netns", "del", probe], check=False)


def netem_args(cfg: LinkConfig) -> list[str]:
    """tc netem arguments equivalent to one direction of the user-space emulator."""
    p = cfg.to_params()
    args = ["delay", f"{p.delay_s * 1e6:.0f}us"]
    if p.jitter_s:
        args += [f"{p.jitter_s * 1e6:.0f}us", "distribution", "uniform"]
    if p.loss:
        args += ["loss", "random", f"{p.loss * 100:.4f}%"]
    if p.rate_bps:
        args += ["rate", f"{int(p.rate_bps)}bit"]
    # netem limits its queue in packets; convert the byte budget at full-size packets, and make
    # room for the packets in flight on the delay line, which netem keeps in the same queue.
    inflight = int((p.rate_bps or 1e9) / 8 * p.delay_s / MTU)
    args += ["limit", str(max(1000, inflight + (p.queue_bytes // MTU if p.queue_bytes else 0)))]
    return args


class NetemLink(BaseLink):
    """Kernel backend: veth between the namespaces, netem on the egress of each end."""

    backend = "netem"
    devs = {"ab": "vethA", "ba": "vethB"}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._base: dict[str, dict[str, int]] = {}

    def _stats(self, d: str) -> dict[str, Any]:
        """``tc -s`` statistics of direction *d*'s netem qdisc."""
        raw = netns.run(["tc", "-n", self._ns(d), "-s", "-j", "qdisc", "show", "dev",
                         self.devs[d]])
        found: dict[str, Any] = next(
            (x for x in json.loads(raw) if x.get("kind") == "netem"), {})
        return found

    def _ns(self, d: str) -> str:
        return self.ns_a if d == "ab" else self.ns_b

    def _start_datapath(self) -> None:
        a_tmp, b_tmp = f"fbva{self.suffix}", f"fbvb{self.suffix}"
        netns.run(["ip", "link", "add", a_tmp, "netns", self.ns_a, "type", "veth",
                   "peer", "name", b_tmp, "netns", self.ns_b])
        for ns, tmp, dev, local, peer in (
            (self.ns_a, a_tmp, "vethA", A_IP, B_IP),
            (self.ns_b, b_tmp, "vethB", B_IP, A_IP),
        ):
            netns.run(["ip", "-n", ns, "link", "set", tmp, "name", dev, "mtu", str(MTU)])
            # No offloads: the user-space path sees MTU-sized packets, so should netem.
            netns.run(netns.ns_exec(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off",
                                         "gro", "off"]), check=False)
            netns.run(["ip", "-n", ns, "addr", "add", f"{local}/32", "peer", f"{peer}/32",
                       "dev", dev])
            netns.run(["ip", "-n", ns, "link", "set", dev, "up"])
        for d in self.devs:
            self._apply(d, "add")

    def _apply(self, d: str, verb: str) -> None:
        netns.run(["tc", "-n", self._ns(d), "qdisc", verb, "dev", self.devs[d], "root", "netem",
                   *netem_args(self.configs[d])])

    def _stop_datapath(self) -> dict[str, Any]:
        try:
            return self.counters()
        except (RuntimeError, ValueError):
            return {}

    def set(self, direction: str = "both", **changes: Any) -> dict[str, Any]:
        """Change settings live with ``tc qdisc change``."""
        changes = {k: v for k, v in changes.items() if v is not None}
        targets = ("ab", "ba") if direction == "both" else (direction,)
        for d in targets:
            self.configs[d] = self.configs[d].updated(changes)
            self._apply(d, "change")
        return {d: c.to_dict() for d, c in self.configs.items()}

    def counters(self) -> dict[str, Any]:
        """netem's own statistics (sent, dropped, backlog); lateness is not observable here."""
        out: dict[str, Any] = {"config": {d: c.to_dict() for d, c in self.configs.items()}}
        for d in self.devs:
            q = self._stats(d)
            base = self._base.get(d, {})
            out[d] = {
                "fwd_packets": q.get("packets", 0) - base.get("packets", 0),
                "fwd_bytes": q.get("bytes", 0) - base.get("bytes", 0),
                "drop_packets": q.get("drops", 0) - base.get("drops", 0),
                "pending": q.get("qlen", 0),
            }
        return out

    def reset_counters(self) -> None:
        """Remember the current qdisc counters and report deltas from now on."""
        for d in self.devs:
            q = self._stats(d)
            self._base[d] = {k: q.get(k, 0) for k in ("packets", "bytes", "drops")}

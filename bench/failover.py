"""bench ``failover`` (issue 13 section 4): UDP blocked at 30 % of a download, unblocked at 60 %.

One emulated link (100 Mbit/s, 100 ms, no random loss), our daemon with its UDP path in
namespace B, three downloads of the same file in the same run:

* ``ours-udp``: ``--transport auto``, UDP never lost (the reference for the failover row);
* ``ours-failover``: ``--transport auto``; the runner blocks UDP port 33001 in namespace B
  (nftables, both ways) once 30 % of the file has arrived and unblocks it at 60 %;
* ``ours-https``: ``--transport https`` (HTTPS streams alone).

The client runs ``transfer()`` in a small script that prints each progress event as it
comes, so the runner sees the bytes (to cut at 30 % and 60 %) and the stall at each
switch: the longest gap between two progress events that moved bytes, within 4 s after
the switch was recorded. Figures are total wall time (the client's ``seconds``) and the
ratios to the two references; the load average is printed beside them.

    python -m bench.failover --out /tmp/fo [--size-mb 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from bench.netem.link import B_IP, EmulatedLink
from bench.peers.ours import UDP_PORT, OursServer, ours_env
from bench.site import Site

CLIENT = r"""
import json, sys, time
from fallback.client.session import transfer
src, dst, fp, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.monotonic()
def progress(ev):
    print("P", round(time.monotonic() - t0, 3), ev.bytes_done, ev.bytes_total, flush=True)
try:
    res = transfer(src, dst, progress, fingerprint=fp, **kw).to_json()
except Exception as exc:
    res = {"ok": False, "error": str(exc)}
print("R", json.dumps(res), flush=True)
"""


def _run(link: EmulatedLink, srv: OursServer, dest: Path, name: str, kw: dict[str, Any],
         cut: tuple[float, float] | None) -> dict[str, Any]:
    """One download; ``cut``: block UDP at this fraction, unblock at that one."""
    argv = link.exec_argv("a", [sys.executable, "-c", CLIENT, srv.url(name, True),
                                str(dest / name), srv.fingerprint, json.dumps(kw)])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ours_env({"FALLBACK_PASSWORD": srv.password}))
    assert p.stdout is not None and p.stderr is not None
    err: list[str] = []
    t = threading.Thread(target=lambda: err.extend(p.stderr.readlines()), daemon=True)
    t.start()
    events: list[tuple[float, int]] = []
    marks: dict[str, float] = {}
    result: dict[str, Any] = {}
    state = 0
    for line in p.stdout:
        parts = line.split(" ", 1)
        if parts[0] == "P":
            at, done, total = line.split()[1:]
            events.append((float(at), int(done)))
            frac = int(done) / max(1, int(total))
            if cut is not None and state == 0 and frac >= cut[0]:
                link.block_udp(UDP_PORT)
                marks["blocked_at"], state = float(at), 1
            elif cut is not None and state == 1 and frac >= cut[1]:
                link.unblock_udp(UDP_PORT)
                marks["unblocked_at"], state = float(at), 2
        elif parts[0] == "R":
            result = json.loads(parts[1])
    p.wait(timeout=30)
    t.join(timeout=5)
    if state == 1:
        link.unblock_udp(UDP_PORT)
    if not result.get("ok"):
        raise RuntimeError(f"{name} {kw}: {result.get('error')} {''.join(err)[-2000:]}")
    stalls = []
    for sw in result.get("switches", []):
        moved = [e[0] for a, e in zip(events, events[1:], strict=False) if e[1] > a[1]]
        gaps = [b - a for a, b in zip(moved, moved[1:], strict=False)
                if sw["at"] - 1.0 <= b <= sw["at"] + 4.0]
        stalls.append({"switch": f"{sw['from']} -> {sw['to']}", "at": sw["at"],
                       "reason": sw["reason"], "stall_s": round(max(gaps, default=0.0), 2)})
    return {"seconds": result["seconds"], "transports": result["transports"],
            "sent_bytes": result["sent_bytes"], "bytes": result["bytes"], "stalls": stalls,
            **marks}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.failover")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size-mb", type=int, default=150)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--rtt", type=float, default=100.0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    with EmulatedLink(rate_mbit=a.rate, rtt_ms=a.rtt, loss_pct=0.0, seed=1) as link:
        site = Site("failover", B_IP, a.out, link, a.rate)
        srv = OursServer(site, a.out / "srv", a.out / "docroot")
        srv.start()
        try:
            name = "f.bin"
            with open(srv.docroot / name, "wb") as f:
                f.write(os.urandom(a.size_mb << 20))
            dest = a.out / "dest"
            dest.mkdir(exist_ok=True)
            base = {"overwrite": "always", "resume": "none", "fsync": False,
                    "password": srv.password}
            for key, kw, cut in (("ours-udp", {"transport": "auto"}, None),
                                 ("ours-failover", {"transport": "auto"}, (0.3, 0.6)),
                                 ("ours-https", {"transport": "https"}, None)):
                rows[key] = _run(link, srv, dest, name, {**base, **kw}, cut)
                rows[key]["load"] = os.getloadavg()
                (dest / name).unlink(missing_ok=True)
        finally:
            srv.stop()
    fo = rows["ours-failover"]["seconds"]
    report = {"link": f"{a.rate:g} Mbit/s, {a.rtt:g} ms", "size_mb": a.size_mb, "rows": rows,
              "failover_vs_udp": round(fo / rows["ours-udp"]["seconds"], 3),
              "failover_vs_https": round(fo / rows["ours-https"]["seconds"], 3)}
    (a.out / "failover.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The UDP path end to end: real daemons (subprocesses), real UDP sockets on loopback.

Files and folders both ways over ``--transport udp`` (key over HTTPS, and X25519 over
plain HTTP), ``auto`` choosing UDP and falling back to HTTPS when UDP is off or its
port is closed, ``udp`` failing in one line, encryption at rest, resume after a kill,
the server's cap winning (and the daemon policing a client that ignores it), a
download's sender figures from the daemon, a stranger's flood, two sessions on the one socket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORDS, make_file, sha256
from tests.interrupt import wait_until

MB = 1 << 20


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and ".fallback" not in p.parts}


def _folder(root: Path) -> Path:
    make_file(root / "a.bin", 2 * MB + 5)
    make_file(root / "sub" / "b.bin", 700_000, seed=1)
    make_file(root / "sub" / "deeper" / "c.bin", 1, seed=2)
    (root / "sub" / "empty.txt").write_bytes(b"")
    return root


def _closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def test_file_both_ways_over_udp(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(udp=True)
    src = make_file(tmp_path / "a.bin", 3 * MB + 17)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp")
    assert rc == 0, err
    assert res["transports"] == ["https", "udp"]
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    assert res["rtt_ms"] > 0 and res["loss_pct"] >= 0 and res["retransmitted_bytes"] >= 0
    back = tmp_path / "back.bin"
    rc, res, err = d.transfer(d.url("/a.bin"), str(back), "--transport", "udp")
    assert rc == 0, err
    assert "udp" in res["transports"] and sha256(back) == sha256(src)
    d.stop()
    log = d.log()
    # the session's paths list the udp path with the bytes it carried; each transport once
    # (control calls and datagrams interleave: the list once grew by two a second)
    for direction in ("upload", "download"):
        assert re.search(rf"direction={direction} .* transport=https,udp "
                         r"paths=\S*udp/127\.0\.0\.1:\d+/3145745 ", log), log


@pytest.mark.parametrize("z", [None, "1452", "4000"])
def test_path_mtu_discovery_raises_the_datagram_size_on_loopback(daemon_factory, tmp_path: Path,
                                                                  z: str | None) -> None:
    """Without ``-Z``, both directions probe up to what the route carries (65,000 on
    loopback: IP_MTU 65,536) and send at that size; ``-Z`` is used as given."""
    d = daemon_factory(udp=True)
    src = make_file(tmp_path / "a.bin", 24 * MB + 3)
    extra = ["-Z", z] if z else []
    want = int(z) if z else 65000
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", *extra)
    assert rc == 0, err
    assert res["datagram_size"] == want, res
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    back = tmp_path / "back.bin"
    rc, res, err = d.transfer(d.url("/a.bin"), str(back), "--transport", "udp", *extra)
    assert rc == 0, err
    assert res["datagram_size"] == want, res  # the daemon's sending end, from its figures
    assert sha256(back) == sha256(src)
    rc, res, err = d.transfer(str(src), d.url("/h.bin"), "--transport", "https")
    assert rc == 0 and res["datagram_size"] == 0, (err, res)


def test_folder_both_ways_over_udp_plain_http_x25519(daemon_factory, tmp_path: Path) -> None:
    """Over a plain-HTTP control channel the key is agreed with X25519: only public keys
    cross it (the daemon refuses a plain-HTTP request without one)."""
    d = daemon_factory(udp=True)
    src = _folder(tmp_path / "tree")
    rc, res, err = d.transfer(str(src), d.url("/", scheme="http"), "--transport", "udp")
    assert rc == 0, err
    assert res["transports"] == ["http", "udp"]
    assert _tree(d.docroots["alice"] / "tree") == _tree(src)
    out = tmp_path / "out"
    out.mkdir()
    rc, res, err = d.transfer(d.url("/tree", scheme="http"), str(out) + "/", "--transport", "udp")
    assert rc == 0, err
    assert "udp" in res["transports"]
    assert _tree(out / "tree") == _tree(src)


def _raw_session(d, direction: str = "download") -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    """(control base URL, session id, token) of a download session opened over plain HTTP."""
    import base64
    import urllib.request

    base = f"http://127.0.0.1:{d.http_port}/.fallback/v1"
    auth = "Basic " + base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    (d.docroots["alice"] / "x").write_bytes(b"x")
    req = urllib.request.Request(f"{base}/session", method="POST", headers={
        "Authorization": auth, "Content-Type": "application/json"},
        data=json.dumps({"direction": direction, "path": "/"}).encode())
    with urllib.request.urlopen(req) as r:
        opened = json.loads(r.read())
    return base, opened["id"], opened["token"]


def _udp_call(base: str, sid: str, token: str, body: object) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{base}/session/{sid}/udp", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_udp_control_call_refusals(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Over plain HTTP the daemon never sends the path secret in clear (400 without an
    X25519 key); malformed requests get a 400 with a reason; a daemon without UDP 501."""
    from transport.udp.crypto import X25519Exchange

    d = daemon_factory(udp=True)
    base, sid, token = _raw_session(d)
    status, body = _udp_call(base, sid, token, {})
    assert status == 400 and "X25519" in body["error"]
    pub = X25519Exchange().public_bytes.hex()
    for bad in ({"x25519": "00" * 32},                      # low-order point: zero secret
                {"x25519": "zz" * 32}, {"x25519": "ab"},    # not 32 bytes of hex
                {"x25519": pub, "datagram_size": 5},        # below Aspera's -Z minimum
                {"x25519": pub, "datagram_size": 1 << 20},
                {"x25519": pub, "flow": {"policy": "greedy"}}, [1]):
        status, body = _udp_call(base, sid, token, bad)
        assert status == 400 and body["error"], (bad, status, body)
    status, body = _udp_call(base, sid, "not-the-token", {"x25519": pub})
    assert status == 401
    status, body = _udp_call(base, sid, token, {"x25519": pub})
    assert status == 200 and len(body["x25519"]) == 64 and "key" not in body
    assert body["port"] == d.udp_port and body["datagram_size"] == 1452
    plain = daemon_factory()  # --no-udp
    base, sid, token = _raw_session(plain)
    status, body = _udp_call(base, sid, token, {"x25519": pub})
    assert status == 501 and "no UDP path" in body["error"]
    with __import__("urllib.request").request.urlopen(f"{base}/info") as r:
        info = json.loads(r.read())
    assert info["udp"] is False and "udp1" not in info["features"]
    base, _, _ = _raw_session(d)
    with __import__("urllib.request").request.urlopen(f"{base}/info") as r:
        info = json.loads(r.read())
    assert info["udp"] is True and "udp1" in info["features"] and info["udp_port"] == d.udp_port
    d.stop()
    assert "Traceback" not in d.log()


def test_auto_chooses_udp(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(udp=True)
    src = make_file(tmp_path / "a.bin", MB)
    rc, res, err = d.transfer(str(src), d.url("/"))
    assert rc == 0, err
    assert res["transports"] == ["https", "udp"]
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)


def test_auto_keeps_a_folder_of_small_files_on_bundles(daemon_factory, tmp_path: Path) -> None:
    """A folder whose bytes are mostly one-block files goes over HTTPS under ``auto``, both
    ways, where they travel in bundle frames (over UDP each would be a file of its own)."""
    d = daemon_factory(udp=True)
    src = tmp_path / "small"
    src.mkdir()
    for k in range(200):
        (src / f"f{k:03d}").write_bytes(bytes([k % 251]) * (2000 + k))
    rc, res, err = d.transfer(str(src), d.url("/"))
    assert rc == 0, err
    assert res["transports"] == ["https"], res
    assert _tree(d.docroots["alice"] / "small") == _tree(src)
    out = tmp_path / "down"
    out.mkdir()
    rc, res, err = d.transfer(d.url("/small"), str(out))
    assert rc == 0, err
    assert res["transports"] == ["https"], res
    assert _tree(out / "small") == _tree(src)


@pytest.mark.parametrize("how", ["disabled", "closed-port"])
def test_auto_falls_back_when_udp_unreachable(daemon_factory, tmp_path: Path, how: str) -> None:
    """Over HTTPS, not waiting for the probe (the streams start beside it): measured
    against the same transfer asked over HTTPS straight away (the machine may be loaded:
    the difference is what auto costs); the result says why UDP was not used."""
    d = daemon_factory(udp=how != "disabled")
    src = make_file(tmp_path / "a.bin", MB)
    _, base, _ = d.transfer(str(src), d.url("/base/"), "--transport", "https")
    extra = ("-O", str(_closed_udp_port())) if how == "closed-port" else ()
    rc, res, err = d.transfer(str(src), d.url("/"), *extra)
    assert rc == 0, err
    assert res["transports"] == ["https"]
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    assert res["seconds"] - base["seconds"] < 1.6, (res["seconds"], base["seconds"])
    if how == "closed-port":  # the ICMP port unreachable ends the probe at once
        assert res["udp_reason"].startswith("unreachable"), res["udp_reason"]
    else:
        assert res["udp_reason"].startswith("refused by server config"), res["udp_reason"]


@pytest.mark.parametrize("how", ["disabled", "closed-port", "silent-port"])
def test_udp_only_fails_in_one_line(daemon_factory, tmp_path: Path, how: str) -> None:
    """Once, at once: no retries (a trial saw a silent port retried 10 times over 60 s,
    one warning line each)."""
    d = daemon_factory(udp=how != "disabled")
    src = make_file(tmp_path / "a.bin", 100_000)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    extra: tuple[str, ...] = ()
    if how == "closed-port":
        extra = ("-O", str(_closed_udp_port()))
    elif how == "silent-port":
        extra = ("-O", str(silent.getsockname()[1]))
    t0 = time.monotonic()
    with silent:
        rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", *extra,
                                  check=False)
    assert time.monotonic() - t0 < 30  # one probe of 3 s; it took 60 s when retried
    assert rc == 1 and res["retries"] == 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: UDP: "), err
    assert "Traceback" not in err
    assert res["ok"] is False
    assert not (d.docroots["alice"] / "a.bin").exists()
    if how == "silent-port":  # the timeout says what the probes saw
        assert re.search(r"timeout: no answer .*; [1-9]\d* datagrams sent, 0 received\)", err), err


def test_encrypted_round_trip_over_udp(daemon_factory, tmp_path: Path) -> None:
    """The envelope stored through UDP is an ordinary one: it decrypts on a download over
    HTTPS and over UDP, and a folder stored half over HTTPS, half over UDP decrypts."""
    d = daemon_factory(udp=True)
    env = {"FALLBACK_FILEPASS": "correct horse battery staple"}
    src = make_file(tmp_path / "secret.bin", 2 * MB + 3)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", "--encrypt", env=env)
    assert rc == 0, err
    stored = d.docroots["alice"] / "secret.bin.fallback-env"
    assert stored.exists() and src.read_bytes()[:4096] not in stored.read_bytes()
    for transport in ("https", "udp"):
        out = tmp_path / f"out-{transport}"
        out.mkdir()
        rc, res, err = d.transfer(d.url("/secret.bin.fallback-env"), str(out) + "/", "--transport",
                                  transport, "--decrypt", env=env)
        assert rc == 0, err
        assert transport in res["transports"]
        assert sha256(out / "secret.bin") == sha256(src)
    # a mixed folder: one file stored over HTTPS, one over UDP, both as envelopes
    tree = tmp_path / "tree"
    make_file(tree / "one.bin", 300_000, seed=3)
    make_file(tree / "two.bin", 400_000, seed=4)
    rc, _, err = d.transfer(str(tree), d.url("/"), "--transport", "https", "--encrypt", env=env)
    assert rc == 0, err
    (tree / "two.bin").unlink()
    make_file(tree / "two.bin", 400_001, seed=5)
    rc, res, err = d.transfer(str(tree), d.url("/"), "--transport", "udp", "--encrypt",
                              "--overwrite", "always", env=env)
    assert rc == 0, err
    assert "udp" in res["transports"]
    out = tmp_path / "mixed"
    out.mkdir()
    rc, res, err = d.transfer(d.url("/tree"), str(out) + "/", "--decrypt", "--transport", "udp",
                              env=env)
    assert rc == 0, err
    assert _tree(out / "tree") == _tree(tree)


def test_server_cap_wins_over_udp(daemon_factory, tmp_path: Path) -> None:
    """The daemon's <in><bandwidth><flow> target (16 Mbit/s) wins over the client's -l 1G."""
    d = daemon_factory(udp=True, extra_xml="<transfer><in><bandwidth><flow>"
                       "<target_rate>16M</target_rate><policy>fixed</policy>"
                       "</flow></bandwidth></in></transfer>")
    src = make_file(tmp_path / "a.bin", 4 * MB)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", "-l", "1G",
                              "--policy", "fixed")
    assert rc == 0, err
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    # 4 MiB at 16 Mbit/s is 2.1 s (plus headers): never faster than ~1.8 s
    assert res["seconds"] > 1.8, res
    assert "policy fixed, target 16 Mbit/s" in d.log()


def test_resume_after_kill_over_udp(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(udp=True)
    src = make_file(tmp_path / "big.bin", 12 * MB, seed=7)
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    p = subprocess.Popen(d.cli_args("transfer", str(src), d.url("/"), "--transport", "udp",
                                    "-l", "24M", "--block-size", "1M", "-q"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from tests.interrupt import journaled

    target = d.docroots["alice"] / "big.bin"
    try:
        wait_until(lambda: len(journaled(target)) >= 3, "three journaled blocks", 30)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not target.exists() or sha256(target) != sha256(src)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", "--block-size", "1M")
    assert rc == 0, err
    assert res["skipped_bytes"] >= 3 * MB, res
    assert "udp" in res["transports"]
    assert sha256(target) == sha256(src)


def _stranger(port: int, cid: int | None, stop: threading.Event, sent: list[int]) -> None:
    """Random datagrams, and forged ones with the right header and connection id."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    n = 0
    try:
        while not stop.is_set():
            for _ in range(200):
                kind = n % 3
                if kind == 0 or cid is None:
                    data = os.urandom(1 + n % 1400)
                else:  # magic FBU?, version 1, DATA/FEEDBACK, flags 0, the cid, a packet number
                    head = bytearray(os.urandom(20))
                    struct.pack_into("!Q", head, 4, cid)
                    data = bytes(head) + os.urandom(100 + n % 1200)
                try:
                    s.sendto(data, ("127.0.0.1", port))
                except OSError:
                    pass
                n += 1
            time.sleep(0.002)
    finally:
        sent.append(n)
        s.close()


def test_stranger_flood_during_transfer(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(udp=True)
    assert d.udp_port is not None
    src = make_file(tmp_path / "a.bin", 6 * MB, seed=9)
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    p = subprocess.Popen(d.cli_args("transfer", str(src), d.url("/"), "--transport", "udp",
                                    "-l", "20M", "--json", "-q", "-v"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, sent = threading.Event(), []
    try:
        m = wait_until(lambda: re.search(r"UDP path ([0-9a-f]{16})", d.log()), "the UDP path")
        # the connection id read from the log, as an on-path stranger would see it
        from transport.udp.codec import DATA, HEADER, MAGIC
        from transport.udp.codec import VERSION_HOLES as VERSION  # the connection's format
        cid = int(m.group(1), 16)
        forged_head = HEADER.pack(MAGIC, VERSION, DATA, 0, cid, 5)
        t1 = threading.Thread(target=_stranger, args=(d.udp_port, None, stop, sent))
        t2 = threading.Thread(target=_stranger, args=(d.udp_port, cid, stop, sent))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for k in range(2000):  # well-formed headers, wrong key: fail the AEAD
            s.sendto(HEADER.pack(MAGIC, VERSION, DATA, 0, cid, 1000 + k) + os.urandom(300),
                     ("127.0.0.1", d.udp_port))
        s.sendto(forged_head + os.urandom(40), ("127.0.0.1", d.udp_port))
        s.close()
        t1.start()
        t2.start()
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            stop.set()
            d.stop()
            raise AssertionError(f"{err}\n{d.log()[-6000:]}") from None
    finally:
        stop.set()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] and "udp" in res["transports"]
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    assert sum(sent) > 1000
    time.sleep(0.7)  # one more watcher round
    d.stop()
    log = d.log()
    assert "Traceback" not in log
    drops = [ln for ln in log.splitlines() if "datagrams dropped" in ln]
    kinds = {re.sub(r"\d+", "N", ln.split(" WARNING ", 1)[1]) for ln in drops}
    assert any("(auth)" in ln for ln in drops), log  # forged ones reached the AEAD and failed
    assert any("no such connection" in ln for ln in drops), log
    assert len(drops) == len(kinds) <= 8, drops  # one line per kind: rate-limited
    # nothing but the file and the daemon's state folder; no partial left in it
    assert {p.name for p in d.docroots["alice"].iterdir()} <= {"a.bin", ".fallback"}
    assert not [p for p in d.docroots["alice"].rglob("*partial*")]


def test_two_sessions_share_the_socket(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(udp=True)
    srcs = [make_file(tmp_path / f"f{k}.bin", 2 * MB + k, seed=k) for k in range(2)]
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    procs = [subprocess.Popen(d.cli_args("transfer", str(s), d.url("/"), "--transport", "udp",
                                         "--json", "-q"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in srcs]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "udp" in json.loads(out.strip().splitlines()[-1])["transports"]
    for s in srcs:
        assert sha256(d.docroots["alice"] / s.name) == sha256(s)
    d.stop()
    cids = set(re.findall(r"UDP path ([0-9a-f]{16})", d.log()))
    assert len(cids) == 2
    assert len(re.findall(r"UDP path on ", d.log())) == 1


def test_coalesce_joins_contiguous_pieces_only() -> None:
    from fallback.udpblocks import coalesce

    d = b"x" * 32
    batch = [(0, 1, 0, b"ab", None), (0, 1, 2, memoryview(b"cd"), None), (0, 1, 4, b"e", None),
             (0, 1, 0, b"", d),                   # a digest: kept, in place, ends the run
             (0, 1, 5, b"f", None), (0, 2, 6, b"g", None),   # another block
             (0, 2, 9, b"h", None),                # a gap
             (1, 2, 10, b"i", None), (1, 2, 11, b"j", None)]
    got = [(f, b, o, bytes(x), dg) for f, b, o, x, dg in coalesce(batch)]
    assert got == [(0, 1, 0, b"abcde", None), (0, 1, 0, b"", d), (0, 1, 5, b"f", None),
                   (0, 2, 6, b"g", None), (0, 2, 9, b"h", None), (1, 2, 10, b"ij", None)]
    assert coalesce([]) == []


async def test_authenticated_bad_pieces_end_the_path_not_the_daemon(daemon_factory) -> None:
    """A client with the key sending pieces the block layer refuses (an unknown file, bytes
    outside their block): the daemon closes that UDP path with ERROR, logs it once, writes
    nothing under the target's name, and goes on serving."""
    import asyncio
    import base64

    import aiohttp

    from fallback.udpcontrol import UdpOffer
    from transport.udp.aio import UdpEndpoint
    from transport.udp.connection import UdpConnection
    from transport.udp.crypto import X25519Exchange, derive_path_keys
    from transport.udp.events import Closed, UdpConfig

    d = daemon_factory(udp=True)
    base = f"http://127.0.0.1:{d.http_port}/.fallback/v1"
    auth = "Basic " + base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    entry = {"path": "", "kind": "file", "size": 200_000, "mtime_ns": 1_700_000_000 * 10**9,
             "mode": 0o644, "block_size": 65536}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/session", headers={"Authorization": auth}, json={
                "direction": "upload", "path": "/evil.bin", "into_dir": False, "name": "",
                "entries": [entry], "overwrite": "always", "encrypt": False,
                "strong_pass": False}) as r:
            assert r.status == 200, await r.text()
            opened = await r.json()
        bearer = {"Authorization": f"Bearer {opened['token']}"}
        sess = f"{base}/session/{opened['id']}"
        async with http.post(f"{sess}/plan", headers=bearer,
                             json={"files": [{"file": 0, "action": "fresh"}]}) as r:
            assert r.status == 200, await r.text()
        for bad in ((7, 0, 0, b"x" * 100), (0, 0, 65500, b"y" * 100)):
            ex = X25519Exchange()
            async with http.post(f"{sess}/udp", headers=bearer,
                                 json={"x25519": ex.public_bytes.hex()}) as r:
                assert r.status == 200, await r.text()
                offer = UdpOffer.from_json(await r.json())
            assert offer.x25519 is not None
            keys = derive_path_keys(ex.path_secret(offer.x25519, opened["id"], initiator=True),
                                    initiator=True)
            ep = await UdpEndpoint.bind("127.0.0.1", 0)
            conn = UdpConnection(UdpConfig(), offer.connection_id, keys, time.perf_counter(),
                                 peer=("127.0.0.1", offer.port))
            closed: asyncio.Future[Closed] = asyncio.get_running_loop().create_future()

            def handler(c, ev, closed=closed):  # type: ignore[no-untyped-def]
                if isinstance(ev, Closed) and not closed.done():
                    closed.set_result(ev)

            ep.add(conn, handler)
            conn.queue_piece(*bad)
            ep.wake()
            got = await asyncio.wait_for(closed, 10)
            ep.close()
            assert got.by_peer and got.error, got
        async with http.get(f"{base}/info") as r:  # still serving
            assert r.status == 200 and (await r.json())["udp"] is True
    d.stop()
    log = d.log()
    assert "Traceback" not in log
    assert len(re.findall(r"UDP path [0-9a-f]{16} closed: .*unknown file index 7", log)) == 1
    assert len(re.findall(r"UDP path [0-9a-f]{16} closed: .*outside block 0", log)) == 1, log
    assert not (d.docroots["alice"] / "evil.bin").exists()


def _capped_daemon(daemon_factory, mbit: int):  # type: ignore[no-untyped-def]
    return daemon_factory(udp=True, extra_xml="<transfer><in><bandwidth><flow>"
                          f"<target_rate>{mbit}M</target_rate>"
                          "</flow></bandwidth></in></transfer>")


def test_server_cap_binds_a_client_asking_more(daemon_factory, tmp_path: Path) -> None:
    """<in> capped at 40 Mbit/s (policy fair), the client asks -l 200M --policy fixed: the
    offer carries the cap, the client's sender obeys it, and the upload's rate is at most
    the cap plus 15 % (datagram bytes; the file's bytes are 4 % fewer)."""
    d = _capped_daemon(daemon_factory, 40)
    src = make_file(tmp_path / "a.bin", 16 * MB)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "udp", "-l", "200M",
                              "--policy", "fixed")
    assert rc == 0, err
    assert sha256(d.docroots["alice"] / "a.bin") == sha256(src)
    mbit = 16 * MB * 8 / res["seconds"] / 1e6
    assert mbit <= 40 * 1.15, res
    assert "policy fixed, target 40 Mbit/s" in d.log()


async def test_daemon_polices_a_client_that_ignores_the_cap(daemon_factory, tmp_path: Path,
                                                            monkeypatch) -> None:
    """A client that sends at 200 Mbit/s whatever the daemon answered (its flow replaced
    before the connection is built): the daemon drops what exceeds the 40 Mbit/s cap plus
    10 %, so the file still arrives whole but no faster than the cap plus 15 %, and the
    daemon's log names the policed datagrams."""
    from fallback.client import udppath
    from fallback.client.session import transfer_async
    from fallback.control import Flow

    real = udppath.udp_config

    def ignore_cap(size: int, flow: Flow, block: int, **kw: object):  # type: ignore[no-untyped-def]
        return real(size, Flow(200_000_000, 0, "fixed"), block, **kw)  # the version agreed

    monkeypatch.setattr(udppath, "udp_config", ignore_cap)
    d = _capped_daemon(daemon_factory, 40)
    src = make_file(tmp_path / "b.bin", 16 * MB, seed=3)
    t0 = time.monotonic()
    res = await transfer_async(str(src), d.url("/", scheme="http"), transport="udp",
                               password=PASSWORDS["alice"], overwrite="always",
                               target_rate="200M", policy="fixed", fsync=False)
    wall = time.monotonic() - t0
    assert sha256(d.docroots["alice"] / "b.bin") == sha256(src)
    assert res.retransmitted_bytes > 16 * MB * 0.3, res  # it sent far more than got through
    mbit = 16 * MB * 8 / min(wall, res.seconds) / 1e6
    assert mbit <= 40 * 1.15, (mbit, res)
    assert wait_until(lambda: "(policed)" in d.log(), 3), d.log()[-2000:]


async def test_download_reports_the_daemons_sender_figures(daemon_factory, tmp_path: Path,
                                                           monkeypatch) -> None:
    """A download's sender is the daemon: its close answer carries ``udp`` (datagrams
    sent, bytes sent again, loss, RTT), and the client's result reports those."""
    from fallback.client import session as client_session
    from fallback.client.session import transfer_async

    seen: list[dict] = []
    real = client_session._daemon_udp_figures

    def spy(result, raw) -> None:  # type: ignore[no-untyped-def]
        seen.append(raw)
        real(result, raw)

    monkeypatch.setattr(client_session, "_daemon_udp_figures", spy)
    d = daemon_factory(udp=True)
    make_file(d.docroots["alice"] / "d.bin", 6 * MB, seed=4)
    out = tmp_path / "out"
    out.mkdir()
    res = await transfer_async(d.url("/d.bin", scheme="http"), str(out) + "/", transport="udp",
                               password=PASSWORDS["alice"], overwrite="always", fsync=False)
    assert res.ok and sha256(out / "d.bin") == sha256(d.docroots["alice"] / "d.bin")
    assert len(seen) == 1, seen
    raw = seen[0]
    assert raw["datagram_size"] == 65000 and res.datagram_size == 65000, raw  # loopback
    assert raw["sent_packets"] >= 6 * MB // 65000, raw
    assert raw["rtt_ms"] > 0 and res.rtt_ms == raw["rtt_ms"], (raw, res)
    assert res.loss_pct == raw["loss_pct"] and res.retransmitted_bytes == \
        raw["retransmitted_bytes"], (raw, res)

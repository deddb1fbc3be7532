"""Failover that does not need UDP (issue 13): HTTPS <-> HTTP when a port is blocked,
retries when every path is down, resuming afterwards, a proxy as the only way through,
and a daemon restarted mid-transfer.

The network tests cut it for real: the daemon runs in one network namespace, the
client in another, joined by veth (``tests/netns.py``), and nftables rules in the
client's namespace drop or refuse its packets. They are skipped, saying why, where
namespaces cannot be made (not root, no ``ip``/``nft``). The restart tests run on
loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fallback.client.manager import GIVE_UP_AFTER
from fallback.client.retry import Retry, retryable
from fallback.result import TransferResult
from tests import netns
from tests.conftest import Daemon, make_file, sha256
from tests.statefiles import ours
from tests.test_proxy import clean_env, start_proxy
from transport.errors import ConnectError, ConnectionLost, IntegrityError, RemoteError

HTTPS, HTTP, UDP = 8443, 8080, 33001  # the daemon's default ports, alone in its namespace


class NsDaemon(Daemon):
    """A daemon in the daemon namespace of ``net``, on ``netns.DAEMON_IP``."""

    net: netns.Net

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text().replace(
            "<bind_address>127.0.0.1</bind_address>", f"<bind_address>{netns.DAEMON_IP}</bind_address>")
        self.config_path.write_text(text)

    def command(self) -> list[str]:
        return self.net.exec("daemon", *super().command())

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

    def url(self, path: str = "/", user: str = "alice", scheme: str = "https") -> str:
        port = HTTPS if scheme == "https" else HTTP
        return f"{scheme}://{user}@{netns.DAEMON_IP}:{port}{path}"


@pytest.fixture
def nsd(net: netns.Net, tmp_path: Path) -> Iterator[NsDaemon]:
    d = NsDaemon(tmp_path / "daemon", HTTP, HTTPS, {"alice": tmp_path / "daemon" / "docroot"})
    d.net = net
    d.base.mkdir(parents=True)
    d.start()
    yield d
    if d.proc is not None:
        d.stop(signal.SIGKILL)


def client(net: netns.Net, d: Daemon, *args: str) -> list[str]:
    """``fallback transfer ARGS --json -q`` run in the client namespace, pinned to ``d``."""
    return net.exec("client", sys.executable, "-m", "fallback", "transfer", *args,
                    "--fingerprint", d.fingerprint, "--json", "-q")


def run_client(net: netns.Net, d: Daemon, *args: str, timeout: float = 60,
               **env: str) -> tuple[int, dict[str, Any], str, float]:
    t0 = time.monotonic()
    p = subprocess.run(client(net, d, *args), capture_output=True, text=True, timeout=timeout,
                       env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent), **env),
                       stdin=subprocess.DEVNULL)
    lines = p.stdout.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if lines else {}, p.stderr, time.monotonic() - t0


# -- HTTPS <-> HTTP ------------------------------------------------------------------------------
def test_https_port_blocked_uses_http(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 2 << 20)
    net.block_tcp(HTTPS)  # silently dropped: the connect times out
    rc, res, err, took = run_client(net, nsd, str(src), nsd.url("/"), "--connect-timeout", "2")
    assert rc == 0, err
    assert res["transports"] == ["http"]
    assert "https on port 8443 cannot be reached" in res["transport_reason"]
    assert "http on port 8080" in res["transport_reason"] and res["switches"] == []
    assert sha256(nsd.docroots["alice"] / "a.bin") == sha256(src)
    assert took < 15
    # --no-fallback refuses to leave HTTPS: a clear error, exit 1, nothing sent in clear
    rc, res, err, _ = run_client(net, nsd, str(src), nsd.url("/b.bin"), "--connect-timeout", "1",
                                 "--no-fallback", "--retries", "0")
    assert rc == 1 and "cannot reach https://10.213.0.1:8443" in res["error"]
    assert not (nsd.docroots["alice"] / "b.bin").exists()
    # a fallback port where something else answers: the URL's own failure is reported
    other = start_proxy(tmp_path, cmd=lambda *a: net.exec("daemon", *a),
                        listen=f"{netns.DAEMON_IP}:3128")
    try:
        rc, res, err, _ = run_client(net, nsd, str(src), nsd.url("/b.bin"), "--connect-timeout",
                                     "1", "--fallback-port", "3128", "--retries", "0")
        assert rc == 1 and "cannot reach https://10.213.0.1:8443" in res["error"], res
    finally:
        other.proc.kill()
        other.proc.wait()


def test_http_port_refused_uses_https(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    src = make_file(tmp_path / "r.bin", 2 << 20)
    net.block_tcp(HTTP, reject=True)  # refused at once (TCP reset)
    rc, res, err, took = run_client(net, nsd, str(src), nsd.url("/", scheme="http"))
    assert rc == 0, err
    assert res["transports"] == ["https"] and "http on port 8080 cannot be reached" in \
        res["transport_reason"]
    assert sha256(nsd.docroots["alice"] / "r.bin") == sha256(src)


# -- every path down -----------------------------------------------------------------------------
def _partial_grows(target: Path, root: Path, least: int, within: float = 15) -> None:
    partial = ours(target, root)[0]
    end = time.monotonic() + within
    while time.monotonic() < end:
        if partial.exists() and partial.stat().st_blocks * 512 >= least:
            return
        time.sleep(0.05)
    raise AssertionError(f"{partial} did not reach {least} bytes")


def test_everything_blocked_fails_clearly_then_resumes(net: netns.Net, nsd: NsDaemon,
                                                       tmp_path: Path) -> None:
    size = 16 << 20
    src = make_file(tmp_path / "big.bin", size)
    target = nsd.docroots["alice"] / "big.bin"
    budget = 3
    args = [str(src), nsd.url("/"), "--target-rate", "40M", "--connect-timeout", "1",
            "--retries", "3", "--retry-timeout", str(budget), "--block-size", "1M"]
    p = subprocess.Popen(client(net, nsd, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent)))
    _partial_grows(target, nsd.docroots["alice"], size // 4)
    net.block_tcp(HTTPS, HTTP)
    t_cut = time.monotonic()
    out, err = p.communicate(timeout=40)
    took = time.monotonic() - t_cut
    res = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 1, err
    assert res["ok"] is False and "cannot reach" in res["error"] and "gave up" in res["error"]
    assert 0 < res["sent_bytes"] < size
    # bounded by the retry settings: a silent cut is a stall after --retry-timeout, then
    # that long again of trying (two routes of 1 s connect each, a second to close), not
    # the manager's own 60 s stall and 10 s no-progress window
    assert took < budget + budget + 2 * 1 + 1 + 2, took
    assert ours(target, nsd.docroots["alice"])[0].exists() and not target.exists()
    net.unblock_tcp(HTTPS, HTTP)
    # The daemon frees the target once it sees the cut-off client's 4 streams end (their
    # FIN, retransmitted now that the path is back); a re-run before that gets a 409.
    end = time.monotonic() + 20
    while nsd.log().count("client disconnected") < 4 and time.monotonic() < end:
        time.sleep(0.1)
    rc, res, err, _ = run_client(net, nsd, *args, "--retries", "10", "--retry-timeout", "15")
    assert rc == 0, err
    assert res["skipped_bytes"] >= size // 4, (res, err)
    assert res["sent_bytes"] <= size - size // 4 + (8 << 20)
    assert sha256(target) == sha256(src)


def test_https_cut_mid_upload_switches_to_http(net: netns.Net, nsd: NsDaemon,
                                               tmp_path: Path) -> None:
    """The HTTPS port refused at a quarter of an upload: the retries re-route over HTTP
    (the daemon's /info named its port), end the cut-off session there and resume."""
    size = 24 << 20
    src = make_file(tmp_path / "sw.bin", size)
    target = nsd.docroots["alice"] / "sw.bin"
    p = subprocess.Popen(client(net, nsd, str(src), nsd.url("/"), "--target-rate", "64M",
                                "--block-size", "1M", "--connect-timeout", "1",
                                "--retry-timeout", "8"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent)))
    _partial_grows(target, nsd.docroots["alice"], size // 4)
    net.block_tcp(HTTPS, reject=True)
    out, err = p.communicate(timeout=40)
    res = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 0, err
    assert res["transports"] == ["https", "http"] and res["retries"] >= 1
    [sw] = res["switches"]
    assert (sw["from"], sw["to"]) == ("https", "http") and sw["at"] > 0
    assert "https on port 8443 cannot be reached" in sw["reason"]
    assert res["transport_reason"] == "the URL says https://"
    assert sha256(target) == sha256(src)
    assert res["sent_bytes"] < size + (8 << 20)  # resumed: only blocks in flight again
    # the daemon saw the old session's end arrive over HTTP
    assert "switched https -> http" in nsd.log()


# -- only a proxy gets through -------------------------------------------------------------------
@pytest.mark.parametrize("auth", [None, "pxuser:px pass"])
def test_only_a_proxy_reaches_the_daemon(net: netns.Net, nsd: NsDaemon, tmp_path: Path,
                                         auth: str | None) -> None:
    proxy = start_proxy(tmp_path, auth, cmd=lambda *a: net.exec("daemon", *a),
                        listen=f"{netns.DAEMON_IP}:3128")
    try:
        net.block_tcp(HTTPS, HTTP)
        net.block_udp(UDP)
        src = make_file(tmp_path / "px.bin", 4 << 20)
        cred = "pxuser:px%20pass@" if auth else ""
        rc, res, err, _ = run_client(net, nsd, str(src), nsd.url("/"), "--connect-timeout", "2",
                                     "--retries", "0",
                                     HTTPS_PROXY=f"http://{cred}{netns.DAEMON_IP}:3128")
        assert rc == 0, err
        assert res["transports"] == ["https"] and res["proxy"] == f"http://{netns.DAEMON_IP}:3128"
        assert "through the proxy" in res["transport_reason"]
        assert sha256(nsd.docroots["alice"] / "px.bin") == sha256(src)
        assert f"CONNECT {netns.DAEMON_IP}:{HTTPS} 200" in proxy.lines()
        if not auth:  # an untrusted certificate names what the daemon presents, read via
            # the proxy (the direct way is blocked), for trust on first use
            p = subprocess.run(net.exec("client", sys.executable, "-m", "fallback", "transfer",
                                        str(src), nsd.url("/t.bin"), "--retries", "0"),
                               capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL,
                               env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent),
                                             FALLBACK_CONFIG_DIR=str(tmp_path / "conf"),
                                             HTTPS_PROXY=f"http://{netns.DAEMON_IP}:3128"))
            assert p.returncode == 1 and f"presented SHA256 {nsd.fingerprint}" in p.stderr, \
                p.stderr
        if auth:  # and without its credentials: refused, exit 3
            rc, res, err, _ = run_client(net, nsd, str(src), nsd.url("/no.bin"), "--retries", "0",
                                         HTTPS_PROXY=f"http://{netns.DAEMON_IP}:3128")
            assert rc == 3 and "407" in res["error"]
    finally:
        proxy.proc.kill()
        proxy.proc.wait()


# -- the daemon dies -----------------------------------------------------------------------------
def test_daemon_restarted_mid_upload_is_resumed_by_retries(daemon: Daemon, tmp_path: Path) -> None:
    size = 24 << 20
    src = make_file(tmp_path / "r.bin", size)
    target = daemon.docroots["alice"] / "r.bin"
    env = clean_env()
    p = subprocess.Popen(daemon.cli_args("transfer", str(src), daemon.url("/"), "--json", "-q",
                                         "--target-rate", "48M", "--block-size", "1M",
                                         "--retries", "20", "--retry-timeout", "20"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _partial_grows(target, daemon.docroots["alice"], size // 4)
    daemon.stop(signal.SIGKILL)
    time.sleep(1.0)
    daemon.start()
    out, err = p.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 0, err
    assert res["ok"] and res["retries"] >= 1 and res["transports"] == ["https"]
    assert sha256(target) == sha256(src)
    # resumed, not started over: what the first daemon journaled was not sent again
    assert res["sent_bytes"] < size + size // 2


def test_daemon_restarted_mid_download_is_resumed_by_retries(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    size = 24 << 20
    src = make_file(daemon.docroots["alice"] / "d.bin", size)
    dst = tmp_path / "got"
    dst.mkdir()
    p = subprocess.Popen(daemon.cli_args("transfer", daemon.url("/d.bin"), str(dst) + "/",
                                         "--json", "-q", "--target-rate", "48M",
                                         "--retries", "20", "--retry-timeout", "20"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=clean_env())
    _partial_grows(dst / "d.bin", dst, size // 4)
    daemon.stop(signal.SIGKILL)
    time.sleep(1.0)
    daemon.start()
    out, err = p.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 0, err
    assert res["ok"] and res["retries"] >= 1
    assert sha256(dst / "d.bin") == sha256(src)
    assert res["sent_bytes"] < size + size // 2


def test_daemon_killed_exit_is_bounded_by_retry_timeout(daemon: Daemon, tmp_path: Path) -> None:
    """Without retries, a dead daemon ends the transfer within --retry-timeout (it took the
    manager's fixed 10 s no-progress window before)."""
    size = 24 << 20
    src = make_file(tmp_path / "k.bin", size)
    target = daemon.docroots["alice"] / "k.bin"
    p = subprocess.Popen(daemon.cli_args("transfer", str(src), daemon.url("/"), "--json", "-q",
                                         "--target-rate", "48M", "--block-size", "1M",
                                         "--retries", "0", "--retry-timeout", "2"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=clean_env())
    _partial_grows(target, daemon.docroots["alice"], size // 4)
    daemon.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    out, err = p.communicate(timeout=60)
    took = time.monotonic() - t_kill
    res = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 1 and res["ok"] is False
    assert took < GIVE_UP_AFTER - 3, took
    assert ours(target, daemon.docroots["alice"])[0].exists()


# -- the pieces ----------------------------------------------------------------------------------
def test_result_records_switches_in_order() -> None:
    r = TransferResult()
    assert r.use("https", "the URL says https://", 0.0) is None
    assert r.use("https", "again", 1.0) is None
    sw = r.use("http", "https on port 8443 cannot be reached", 2.5)
    assert sw is not None and str(sw) == "https -> http: https on port 8443 cannot be reached"
    r.use("udp", "probe answered", 4.0)
    j = r.to_json()
    assert j["transports"] == ["https", "http", "udp"]
    assert j["transport_reason"] == "the URL says https://"
    assert j["switches"] == [
        {"at": 2.5, "from": "https", "to": "http", "reason": "https on port 8443 cannot be reached"},
        {"at": 4.0, "from": "http", "to": "udp", "reason": "probe answered"}]


def test_retry_budget() -> None:
    now = [100.0]
    r = Retry(3, 10.0, clock=lambda: now[0], rand=lambda: 0.5)
    lost = ConnectionLost("x")
    assert retryable(lost) and retryable(ConnectError("y"))
    assert retryable(RemoteError("unknown or expired session", peer_status=404))
    assert not retryable(RemoteError("no such file", peer_status=404))
    assert not retryable(IntegrityError("bad"))
    # the outage counts from when every path was first seen down
    assert r.after(lost, down_since=96.0, moved=False) == pytest.approx(0.25)
    assert r.left() == pytest.approx(6.0)
    now[0] = 105.0
    assert r.after(lost, down_since=None, moved=False) == pytest.approx(0.5)
    now[0] = 106.5
    assert r.after(lost, down_since=None, moved=False) is None  # past 96 + 10
    # progress starts a new outage; the count of re-connections bounds it too
    assert r.after(lost, down_since=None, moved=True) is not None
    assert r.after(lost, down_since=None, moved=False) is not None
    assert r.after(lost, down_since=None, moved=False) is not None
    assert r.after(lost, down_since=None, moved=False) is None  # 3 retries used
    assert r.after(IntegrityError("bad"), down_since=None, moved=True) is None


def test_progress_bar_prints_a_line_at_each_switch() -> None:
    import io

    from fallback.progress import ProgressPrinter
    from fallback.result import ProgressEvent

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = ProgressPrinter(out)
    bar(ProgressEvent(10, 100, 8e6, "f.bin", "https"))
    bar(ProgressEvent(10, 100, 0.0, "f.bin", "http",
                      switch="https -> http: https on port 8443 cannot be reached"))
    bar(ProgressEvent(100, 100, 8e6, "f.bin", "http", done=True))
    bar.close()
    assert "switched https -> http: https on port 8443 cannot be reached" in out.getvalue()


def test_router_tries_the_other_scheme_only_where_it_knows_or_may_guess_the_port() -> None:
    from fallback.remote import Router, parse_url

    def ports(url: str, info: dict[str, Any] | None = None, **kw: Any) -> list[tuple[str, int]]:
        opts = {"proxy": "none", "fallback": True, "fallback_port": None,
                "connect_timeout": 1.0, **kw}
        r = Router(parse_url(url), True, True, **opts)
        return [(c.scheme, c.port) for c in r.candidates(info)]

    assert ports("https://a@h/x") == [("https", 8443), ("http", 8080)]
    assert ports("http://a@h/x") == [("http", 8080), ("https", 8443)]
    # a port the user named: no guessed port gets the password
    assert ports("https://a@h:9443/x") == [("https", 9443)]
    assert ports("https://a@h:9443/x", fallback_port=9080) == [("https", 9443), ("http", 9080)]
    assert ports("https://a@h/x", fallback=False) == [("https", 8443)]
    # the daemon's /info, once known, says where its other scheme is, or that it has none
    info = {"enable_http": True, "http_port": 7080, "enable_https": True, "https_port": 9443}
    assert ports("https://a@h:9443/x", info) == [("https", 9443), ("http", 7080)]
    assert ports("https://a@h:9443/x", {**info, "enable_http": False}) == [("https", 9443)]

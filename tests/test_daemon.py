"""The daemon process: signals, reloads, its log, the shared port, the embedded defaults."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fallback.auth import hash_password
from fallback.tls import fingerprint
from tests.conftest import PASSWORDS, Daemon, make_file, password_hash, sha256
from tests.test_refusals import cli
from transport.blocks.receiver import inspect_partial, journal_path, partial_path
from transport.blocks.statedir import StateDir

BIG = 256 << 20
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO|WARNING|ERROR) ")
FP = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_file(tmp_path_factory.mktemp("big") / "big.bin", BIG, seed=21)


def wait_for(pred, timeout: float = 20, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_log(d: Daemon, mark: int, needle: str, timeout: float = 20) -> list[str]:
    wait_for(lambda: needle in d.log()[mark:], timeout, repr(needle))
    return d.log()[mark:].splitlines()


def assert_log_clean(text: str) -> None:
    lines = text.splitlines()
    assert not any("Traceback" in ln for ln in lines), text
    assert all(LOG_LINE.match(ln) for ln in lines), text


def start_upload(d: Daemon, src: Path, url: str, *opts: str,
                 user: str = "alice") -> subprocess.Popen[str]:
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS[user]}
    return subprocess.Popen(d.cli_args("transfer", str(src), url, "--json", "-q", *opts),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen[str]) -> tuple[int, dict, str]:
    out, err = p.communicate(timeout=120)
    lines = out.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if lines else {}, err


def xfer(d: Daemon, src: str, dst: str, *opts: str, user: str = "alice",
         password: str | None = None, check: bool = True) -> tuple[int, dict, str]:
    """``Daemon.transfer`` through the same CLI entry point, in this process (saves a process
    start per call; the long uploads below still run as real processes)."""
    rc, out, err = cli(d.cli_args("transfer", src, dst, "--json", "-q", *opts),
                       password or PASSWORDS[user])
    lines = out.strip().splitlines()
    res = json.loads(lines[-1]) if lines else {}
    if check and rc != 0:
        raise AssertionError(f"transfer failed rc={rc}: {err}\n{res}")
    return rc, res, err


def has_data(path: Path) -> bool:
    try:
        return os.stat(path).st_blocks * 512 >= 8 << 20
    except FileNotFoundError:
        return False


# -- SIGTERM --------------------------------------------------------------------------------------
def test_sigterm_during_upload_checkpoints_and_the_rerun_resumes(daemon_factory, big: Path) -> None:
    d = daemon_factory()
    target = d.docroots["alice"] / "in" / big.name
    state = StateDir(d.docroots["alice"])  # partials are kept at the docroot's top
    # plain HTTP: the big upload costs no TLS CPU, twice
    # --retries 0: the client gives up at once instead of waiting for the daemon to return
    up = start_upload(d, big, d.url("/in/", scheme="http"), "--transport", "http", "--retries", "0")
    wait_for(lambda: has_data(partial_path(target, state)), what="the upload to write data")
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(15)
    took = time.monotonic() - t0
    d.proc = None
    assert rc == 0 and took < 5, (rc, took)
    rc, res, err = finish(up)
    assert rc == 1 and not res["ok"] and "Traceback" not in err
    assert err.startswith("error: "), err
    # no file under the real name; the partial and its journal stay, with records
    assert not target.exists()
    assert partial_path(target, state).exists() and journal_path(target, state).exists()
    assert sorted(p.name for p in target.parent.iterdir()) == []  # nothing beside the target
    held = inspect_partial(target, state=state)
    assert held.identity is not None and 0 < len(held.have) < BIG // (4 << 20)
    log = d.log()
    assert_log_clean(log)
    assert "stopping: checkpointing 1 sessions" in log
    assert re.search(r"session \w{8} user=alice peer=127\.0\.0\.1 direction=upload "
                     r"path=/in/big\.bin "
                     r"files=1 committed=0 skipped=0 bytes=[1-9]\d* transport=http "
                     r"paths=http/127\.0\.0\.1/[1-9]\d* result=error: daemon stopped$", log, re.M), log
    assert log.rstrip().endswith("stopped")
    # after a restart the same command resumes from the journal
    d.start()
    rc, res, err = xfer(d, str(big), d.url("/in/", scheme="http"), "--transport", "http")
    assert rc == 0 and res["ok"], err
    assert res["skipped_bytes"] >= len(held.have) * (4 << 20)
    assert res["skipped_bytes"] + res["sent_bytes"] == BIG and res["sent_bytes"] < BIG
    assert filecmp.cmp(target, big, shallow=False)
    assert not partial_path(target, state).exists() and not journal_path(target, state).exists()


# -- SIGHUP ---------------------------------------------------------------------------------------
def test_sighup_reload_adds_a_user_while_a_transfer_runs(daemon_factory, big: Path,
                                                         tmp_path: Path) -> None:
    d = daemon_factory(users=("alice",))
    small = make_file(tmp_path / "bob.bin", 300_000, seed=22)
    rc, _, err = xfer(d, str(small), d.url("/", user="bob"), user="bob", check=False)
    assert rc == 3 and err.strip() == "error: wrong user name or password"
    # rewrite the config: bob, with a password of his own
    d.docroots["bob"] = d.base / "docroot" / "bob"
    d.docroots["bob"].mkdir(parents=True)
    d.write_config()
    new_pw = "bob-brand-new-pw"
    text = d.config_path.read_text().replace(password_hash("bob"), hash_password(new_pw))
    d.config_path.write_text(text)
    target = d.docroots["alice"] / "during" / big.name
    mark = len(d.log())
    up = start_upload(d, big, d.url("/during/", scheme="http"), "--transport", "http")
    wait_for(lambda: partial_path(target, StateDir(d.docroots["alice"])).exists(),
             what="the upload to start")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    lines = wait_log(d, mark, "reloaded")
    assert f"reloaded {d.config_path}: 2 users" in lines[-1]
    # the transfer running across the reload completes, intact
    rc, res, err = finish(up)
    assert rc == 0 and res["ok"], err
    assert filecmp.cmp(target, big, shallow=False)
    lines = d.log()[mark:].splitlines()
    opened = next(i for i, ln in enumerate(lines) if "upload to /during/big.bin" in ln)
    reloaded = next(i for i, ln in enumerate(lines) if "reloaded" in ln)
    closed = next(i for i, ln in enumerate(lines) if "path=/during/big.bin" in ln)
    assert opened < reloaded < closed and lines[closed].endswith("result=ok")
    # bob can transfer now, with the new password only
    rc, res, err = xfer(d, str(small), d.url("/", user="bob"), password=new_pw)
    assert sha256(d.docroots["bob"] / small.name) == sha256(small)
    rc, res, err = xfer(d, str(small), d.url("/again/", user="bob"), user="bob",
                        password=PASSWORDS["bob"], check=False)  # the old one
    assert rc == 3 and err.strip() == "error: wrong user name or password"
    assert_log_clean(d.log())


def test_sighup_with_a_broken_config_keeps_the_old_one(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    good = d.config_path.read_text()
    lines = good.splitlines()
    port_line = next(i for i, ln in enumerate(lines) if "<http_port>" in ln) + 1
    broken = good.replace(f"<http_port>{d.http_port}</http_port>", "<http_port>80a</http_port>")
    broken = broken.replace("<users>", "<bogus/><users>")
    users_line = next(i for i, ln in enumerate(broken.splitlines()) if "<bogus/>" in ln) + 1
    d.config_path.write_text(broken)
    mark = len(d.log())
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d, mark, "unknown element <bogus>")
    time.sleep(0.1)
    new = d.log()[mark:].splitlines()
    assert [ln.split(" ", 4)[4] for ln in new] == [
        f'reload refused: {d.config_path}:{port_line}: http_port: "80a" is not an integer',
        f"reload refused: {d.config_path}:{users_line}: unknown element <bogus> in <CONF>",
    ]
    assert all(" fallback.daemon ERROR " in ln for ln in new)
    # the old config still rules: same users, same passwords, still serving
    f = make_file(tmp_path / "k.bin", 123_456, seed=23)
    for user in ("alice", "bob"):
        rc, res, err = xfer(d, str(f), d.url("/kept/", user=user), user=user)
        assert sha256(d.docroots[user] / "kept" / f.name) == sha256(f)
    assert d.proc.poll() is None
    assert_log_clean(d.log())


# -- the session line -----------------------------------------------------------------------------
def test_session_log_line_has_the_facts(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    f = make_file(tmp_path / "s.bin", 5_000_000, seed=24)
    xfer(d, str(f), d.url("/logs/", scheme="http"), "--transport", "http")
    xfer(d, d.url("/logs/s.bin"), str(tmp_path / "back.bin"), user="alice")
    xfer(d, str(f), d.url("/logs/", user="bob"), "--transport", "https", user="bob")
    xfer(d, str(f), d.url("/logs/", user="bob"), "--transport", "https", user="bob")
    assert sha256(tmp_path / "back.bin") == sha256(f)
    log = d.log()
    sessions = [ln.split(" fallback.daemon INFO ", 1)[1] for ln in log.splitlines()
                if re.search(r"INFO session \w{8} user=", ln)]
    pattern = (r"session [0-9a-f]{8} user=%s peer=127\.0\.0\.1 direction=%s path=/logs/s\.bin "
               r"files=1 committed=%d skipped=%d bytes=%d transport=%s "
               r"paths=%s/127\.0\.0\.1/%d result=ok")
    expect = [("alice", "upload", 1, 0, 5_000_000, "http"),
              ("alice", "download", 0, 0, 5_000_000, "https"),
              ("bob", "upload", 1, 0, 5_000_000, "https"),
              ("bob", "upload", 0, 1, 0, "https")]  # unchanged: skipped, nothing moved
    assert len(sessions) == len(expect), sessions
    for line, e in zip(sessions, expect, strict=True):
        # each session's one path: its scheme and peer, with the bytes it carried
        assert re.fullmatch(pattern % (*e, e[-1], e[-2]), line), (line, e)
    assert_log_clean(log)


# -- shared port ----------------------------------------------------------------------------------
def test_http_and_https_on_one_port(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(start=False)
    d.https_port = d.http_port
    for root in d.docroots.values():
        root.mkdir(parents=True)
    d.write_config()
    v = subprocess.run([sys.executable, "-m", "fallback", "config", "validate", str(d.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert v.returncode == 0, v.stderr
    assert v.stdout.splitlines()[-1] == (f"note: HTTP and HTTPS share port {d.http_port} "
                                         "(TLS is recognised per connection)")
    d.start()
    f = make_file(tmp_path / "one.bin", 6_000_000, seed=25)
    for scheme in ("http", "https"):
        rc, res, err = xfer(d, str(f), d.url(f"/{scheme}/", scheme=scheme), "--transport", scheme)
        assert res["transports"] == [scheme]
        assert sha256(d.docroots["alice"] / scheme / "one.bin") == sha256(f)
        back = tmp_path / f"back-{scheme}.bin"
        rc, res, err = xfer(d, d.url(f"/{scheme}/one.bin", scheme=scheme), str(back),
                            "--transport", scheme)
        assert res["transports"] == [scheme] and sha256(back) == sha256(f)
    # plain clients too, both schemes on the one port
    for scheme, tls in (("http", []), ("https", ["--cacert", str(d.base / "state" / "cert.pem")])):
        p = subprocess.run(["curl", "-sS", *tls, "-u", f"alice:{PASSWORDS['alice']}",
                            f"{scheme}://127.0.0.1:{d.http_port}/http/one.bin"],
                           capture_output=True, timeout=30)
        assert p.returncode == 0 and p.stdout == f.read_bytes()
    out = d.log()
    assert_log_clean(out)


# -- no config at all -----------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], Path]]:
    if not (_port_free(8080) and _port_free(8443)):
        pytest.skip("the default ports 8080/8443 are in use")
    env = {**os.environ, "FALLBACK_PASSWORD": "demo-password"}
    log = open(tmp_path / "daemon.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "fallback", "serve"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=log, text=True)
    assert p.stdout is not None
    lines: list[str] = []
    try:
        while (line := p.stdout.readline()) and line.strip() != "ready":
            lines.append(line.rstrip("\n"))
        if p.poll() is not None or not line:
            if "cannot listen" in (tmp_path / "daemon.log").read_text():
                pytest.skip("the default ports were taken meanwhile")
            raise AssertionError((tmp_path / "daemon.log").read_text())
        yield p, lines, tmp_path
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def test_serve_without_config_uses_embedded_defaults(embedded, tmp_path: Path) -> None:
    p, lines, cwd = embedded
    data = cwd / "fallback-data"
    cert = data / "cert.pem"
    assert lines[0] == "embedded defaults: user demo, password (from FALLBACK_PASSWORD)"
    assert lines[1].startswith("no config file (looked for /etc/fallback/aspera.conf, ")
    m = re.fullmatch(rf"certificate {re.escape(str(cert))} fingerprint SHA256 ({FP})", lines[2])
    assert m and m[1] == fingerprint(cert)
    assert lines[3:6] == ["serving http://localhost:8080/", "serving https://localhost:8443/",
                          f"docroot demo={data / 'docroot'}"]
    assert lines[6].startswith(f"clients verify it with --cacert {cert} (names: localhost, ")
    assert lines[7].startswith("listening on 127.0.0.1 only: other hosts cannot connect")
    assert "demo-password" not in "\n".join(lines)
    # user demo transfers over HTTPS, pinned by the printed fingerprint
    f = make_file(tmp_path / "demo.bin", 1_500_000, seed=26)
    env = {**os.environ, "FALLBACK_PASSWORD": "demo-password"}
    t = subprocess.run([sys.executable, "-m", "fallback", "transfer", str(f),
                        "https://demo@127.0.0.1:8443/", "--fingerprint", m[1], "--json", "-q"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert t.returncode == 0, t.stderr
    # auto: over UDP when the default UDP port 33001 was free for this daemon, else HTTPS
    assert json.loads(t.stdout.splitlines()[-1])["transports"] in (["https"], ["https", "udp"])
    assert sha256(data / "docroot" / "demo.bin") == sha256(f)
    g = subprocess.run(["curl", "-sS", "-u", "demo:demo-password",
                        "http://127.0.0.1:8080/demo.bin"], capture_output=True, timeout=30)
    assert g.stdout == f.read_bytes()
    # without a config file a SIGHUP has nothing to reload; SIGTERM stops it cleanly
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: no config file to reload" in (cwd / "daemon.log").read_text(), 10,
             "the SIGHUP line")
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert_log_clean((cwd / "daemon.log").read_text())


def test_control_body_arriving_in_pieces_is_read_whole(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """A JSON body split across TCP segments (as on a real WAN) is read to its end."""
    import base64
    import socket as _s

    d = daemon_factory()
    body = json.dumps({"direction": "download", "path": "/"}).encode()
    auth = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    head = (f"POST /.fallback/v1/session HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with _s.create_connection(("127.0.0.1", d.http_port), timeout=10) as c:
        c.sendall(head + body[:10])
        time.sleep(0.3)
        c.sendall(body[10:])
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    status = reply.split(b"\r\n", 1)[0]
    assert b" 200 " in status, reply[:300]
    assert b'"entries"' in reply


def test_a_port_it_cannot_listen_on_is_named(tmp_path: Path) -> None:
    """Before: "error: cannot listen: Address already in use", not saying which of its
    ports (trial). Now the address and port, one line, exit 1."""
    from tests.conftest import free_port
    from tests.control_client import conf_xml
    d = Daemon(tmp_path, free_port(), free_port(), {"alice": tmp_path / "docroot" / "alice"})
    d.config_path.write_text(conf_xml(d, {"alice": (True, True)}))
    (tmp_path / "docroot" / "alice").mkdir(parents=True)
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", d.https_port))
        held.listen()
        p = subprocess.run([sys.executable, "-m", "fallback", "serve", "--config",
                            str(d.config_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{d.https_port}: Address already in use")
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--docroot", "/nonexistent"],
     "error: --docroot applies only without a config file; {conf} gives the docroots "
     "(<file_system>/<docroot>, <user>/<docroot>)"),
    (["--udp-port", "40000", "--no-udp"],
     "error: --udp-port and --no-udp contradict each other: give one"),
    (["--bind", "not-an-ip"],
     'error: --bind: "not-an-ip" does not resolve (Name or service not known): give an IP '
     "address of this host, or a host name that resolves to one"),
])
def test_serve_flag_never_silently_ignored(tmp_path: Path, flags: list[str], message: str) -> None:
    """Before (trial): `serve --config r.conf --docroot /nonexistent` served the config's
    docroots and said nothing; --udp-port with --no-udp was dropped; --bind not-an-ip got
    as far as listening. Now each is a usage error: one line, exit 2, nothing started."""
    from tests.conftest import free_port
    from tests.control_client import conf_xml
    d = Daemon(tmp_path, free_port(), free_port(), {"alice": tmp_path / "docroot" / "alice"})
    d.config_path.write_text(conf_xml(d, {"alice": (True, True)}))
    (tmp_path / "docroot" / "alice").mkdir(parents=True)
    p = subprocess.run([sys.executable, "-m", "fallback", "serve", "--config",
                        str(d.config_path), *flags], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [message.format(conf=d.config_path)]
    assert "ready" not in p.stdout


def test_config_that_validates_starts_and_one_that_serve_refuses_does_not_validate(
        tmp_path: Path) -> None:
    """The rule behind `config validate`: exit 0 means `serve` starts. The trial's
    <bind_address>not-an-ip</bind_address> validated, then serve failed at listen."""
    from tests.conftest import free_port
    from tests.control_client import conf_xml
    d = Daemon(tmp_path, free_port(), free_port(), {"alice": tmp_path / "docroot" / "alice"})
    (tmp_path / "docroot" / "alice").mkdir(parents=True)
    d.config_path.write_text(conf_xml(d, {"alice": (True, True)}).replace(
        "<bind_address>127.0.0.1</bind_address>", "<bind_address>not-an-ip</bind_address>"))
    assert "not-an-ip" in d.config_path.read_text()
    for cmd in (["config", "validate"], ["serve", "--config"]):
        p = subprocess.run([sys.executable, "-m", "fallback", *cmd, str(d.config_path)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        [line] = p.stderr.splitlines()
        assert line.startswith(f"{d.config_path}:") and "bind_address: \"not-an-ip\" does not " \
            "resolve" in line

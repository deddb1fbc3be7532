"""Plain HTTP clients (curl, aria2c) on the same URLs the daemon serves transfers on.

Every path outside ``/.fallback/v1`` is the user's docroot: GET/HEAD with
``Range`` and whole-file PUT, behind HTTP Basic auth, over HTTP and HTTPS.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from transport.blocks.receiver import journal_path, partial_path
from transport.blocks.statedir import StateDir

ALICE = f"alice:{PASSWORDS['alice']}"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO|WARNING|ERROR) ")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    b = tmp_path_factory.mktemp("plain")
    d = Daemon(b, free_port(), free_port(), {u: b / "docroot" / u for u in ("alice", "bob")})
    d.start()
    make_file(d.docroots["alice"] / "f.bin", 1_000_003, seed=11)
    yield d
    assert d.stop() == 0


def base(d: Daemon, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{d.http_port if scheme == 'http' else d.https_port}"


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60)


def cacert(d: Daemon) -> str:
    return str(d.base / "state" / "cert.pem")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_curl_get_equals_file(srv: Daemon, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / "got.bin"
    tls = ["--cacert", cacert(srv)] if scheme == "https" else []
    p = curl(*tls, "-u", ALICE, "-o", str(out), "-w", "%{http_code} %{size_download}",
             f"{base(srv, scheme)}/f.bin")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == "200 1000003"
    assert sha256(out) == sha256(srv.docroots["alice"] / "f.bin")


def test_curl_range_returns_exactly_those_bytes(srv: Daemon, tmp_path: Path) -> None:
    out, headers = tmp_path / "part", tmp_path / "headers"
    p = curl("-u", ALICE, "-r", "100-199", "-o", str(out), "-D", str(headers),
             "-w", "%{http_code}", f"{base(srv)}/f.bin")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"206"
    data = (srv.docroots["alice"] / "f.bin").read_bytes()
    assert out.read_bytes() == data[100:200]
    h = headers.read_bytes().decode().lower().split("\r\n")
    assert h[0] == "http/1.1 206 partial content"
    assert "content-range: bytes 100-199/1000003" in h
    assert "content-length: 100" in h
    # a suffix range over HTTPS too
    p = curl("--cacert", cacert(srv), "-u", ALICE, "-r", "-10", f"{base(srv, 'https')}/f.bin")
    assert p.stdout == data[-10:]


def test_head_gives_content_length_and_no_body(srv: Daemon) -> None:
    p = curl("-u", ALICE, "-I", f"{base(srv)}/f.bin")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Length: 1000003" in lines
    assert "Accept-Ranges: bytes" in lines
    assert p.stdout.endswith(b"\r\n\r\n")  # headers only


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed")
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_aria2c_segmented_download_with_basic_auth(srv: Daemon, tmp_path: Path,
                                                   scheme: str) -> None:
    src = srv.docroots["alice"] / "big40.bin"
    if not src.exists():
        make_file(src, 40 << 20, seed=12)
    tls = [f"--ca-certificate={cacert(srv)}"] if scheme == "https" else []
    p = subprocess.run(
        ["aria2c", "-x8", "-s8", "--min-split-size=1M", "--http-user=alice",
         f"--http-passwd={PASSWORDS['alice']}", "--summary-interval=0", "--console-log-level=warn",
         "--file-allocation=none", "--auto-file-renaming=false", *tls, "-d", str(tmp_path),
         "-o", "big40.bin", f"{base(srv, scheme)}/big40.bin"],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^[0-9a-f]{6}\|OK  \|.*\|.*big40\.bin$", p.stdout, re.M), p.stdout
    assert sha256(tmp_path / "big40.bin") == sha256(src)


def test_curl_put_uploads_and_overwrites(srv: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "up.bin", 2_500_000, seed=13)
    url = f"{base(srv)}/up/deeper/name.bin"
    p = curl("-T", str(f), "-u", ALICE, "-w", "\n%{http_code}", url)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == '{"path": "/up/deeper/name.bin"}\n201'
    stored = srv.docroots["alice"] / "up" / "deeper" / "name.bin"
    assert sha256(stored) == sha256(f)
    # again with other content, over HTTPS: replaced, 204
    g = make_file(tmp_path / "up2.bin", 12_345, seed=14)
    p = curl("--cacert", cacert(srv), "-T", str(g), "-u", ALICE, "-w", "%{http_code}",
             f"{base(srv, 'https')}/up/deeper/name.bin")
    assert p.stdout == b"204"
    assert sha256(stored) == sha256(g)
    # a leading dot is part of the name, in the file system and in the answer
    p = curl("-T", str(g), "-u", ALICE, "-w", "\n%{http_code}", f"{base(srv)}/up/.hidden")
    assert p.stdout.decode() == '{"path": "/up/.hidden"}\n201'
    assert sha256(srv.docroots["alice"] / "up" / ".hidden") == sha256(g)
    # the upload is visible to plain GET and nothing is left beside it
    p = curl("-u", ALICE, f"{base(srv)}/up/deeper/")
    assert json.loads(p.stdout) == {"folder": "/up/deeper", "entries": ["name.bin"]}


def test_put_refusals(srv: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "x.bin", 10)
    (srv.docroots["alice"] / "afolder").mkdir(exist_ok=True)
    cases = [("/afolder", 409, '{"error": "/afolder: is a folder"}'),
             ("/f.bin/x", 409, '{"error": "/f.bin: a file, not a folder (cannot write /f.bin/x)"}'),
             ("/.fallback/x", 403, '{"error": "that name is reserved"}'),
             ("/", 400, '{"error": "PUT needs a file name"}')]
    for path, status, body in cases:
        p = curl("-X", "PUT", "--data-binary", f"@{f}", "-u", ALICE, "-w", "\n%{http_code}",
                 base(srv) + path)
        assert p.stdout.decode() == f"{body}\n{status}", path
    assert sorted(p.name for p in (srv.docroots["alice"] / "afolder").iterdir()) == []
    # GET below a file is simply not found
    p = curl("-u", ALICE, "-w", "\n%{http_code}", f"{base(srv)}/f.bin/x")
    assert p.stdout == b'{"error": "/f.bin/x: no such file"}\n404'


def wait_log(d: Daemon, mark: int, needle: str, timeout: float = 10) -> list[str]:
    """The daemon's log lines since ``mark``, once one of them holds ``needle``."""
    deadline = time.monotonic() + timeout
    while needle not in d.log()[mark:]:
        assert time.monotonic() < deadline, d.log()[mark:]
        time.sleep(0.02)
    return d.log()[mark:].splitlines()


def _auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_put_cut_off_mid_body_leaves_no_file(srv: Daemon) -> None:
    folder = srv.docroots["alice"] / "cut"
    target = folder / "name.bin"
    ours = (partial_path(target, StateDir(srv.docroots["alice"])),
            journal_path(target, StateDir(srv.docroots["alice"])))
    mark = len(srv.log())
    with socket.create_connection(("127.0.0.1", srv.http_port)) as s:
        s.sendall((f"PUT /cut/name.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: {_auth_header('alice', PASSWORDS['alice'])}\r\n"
                   "Content-Length: 5000000\r\n\r\n").encode())
        s.sendall(b"x" * 1_000_000)
        deadline = time.monotonic() + 10
        while not ours[0].exists():  # the partial exists (in the state folder): mid-body
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not target.exists() and list(folder.iterdir()) == []
    # the daemon notices the close and drops the partial and its journal
    deadline = time.monotonic() + 10
    while any(p.exists() for p in ours):
        assert time.monotonic() < deadline, ours
        time.sleep(0.02)
    assert not target.exists() and list(folder.iterdir()) == []
    lines = wait_log(srv, mark, "client disconnected")
    assert all(LOG_LINE.match(ln) for ln in lines), lines
    assert sum("PUT /cut/name.bin: client disconnected" in ln for ln in lines) == 1
    # and it still serves
    p = curl("-u", ALICE, "-w", "%{http_code}", "-o", "/dev/null", f"{base(srv)}/f.bin")
    assert p.stdout == b"200"


def test_chunked_put_without_last_chunk_leaves_no_file(srv: Daemon) -> None:
    """A chunked body (no length to check against) is complete only with its last chunk."""
    mark = len(srv.log())
    with socket.create_connection(("127.0.0.1", srv.http_port)) as s:
        s.sendall((f"PUT /cut2/c.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: {_auth_header('alice', PASSWORDS['alice'])}\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n").encode())
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    folder = srv.docroots["alice"] / "cut2"
    ours = [f(folder / "c.bin", StateDir(srv.docroots["alice"])) for f in (partial_path, journal_path)]
    deadline = time.monotonic() + 10
    while folder.exists() and any(folder.iterdir()) or any(p.exists() for p in ours):
        assert time.monotonic() < deadline, list(folder.iterdir())
        time.sleep(0.02)
    assert not (folder / "c.bin").exists()
    assert not answer.startswith(b"HTTP/1.1 2"), answer
    lines = [ln for ln in wait_log(srv, mark, "client disconnected")
             if " fallback.access " not in ln]  # the access line is test_cli_ux's
    assert [ln.split(" ", 4)[4] for ln in lines] == [
        "127.0.0.1 PUT /cut2/c.bin: client disconnected"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_no_auth_is_401_with_www_authenticate(srv: Daemon, scheme: str) -> None:
    tls = ["--cacert", cacert(srv)] if scheme == "https" else []
    for method in ([], ["-T", "/dev/null"]):
        p = curl(*tls, *method, "-i", f"{base(srv, scheme)}/f.bin")
        # curl -T asks "Expect: 100-continue"; an interim 100 may precede the answer
        answer = p.stdout.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 401 Unauthorized"
        assert 'WWW-Authenticate: Basic realm="fallback"' in lines
        assert json.loads(body) == {"error": "authentication required"}
    p = curl(*tls, "-u", "alice:wrong", "-w", "\n%{http_code}", f"{base(srv, scheme)}/f.bin")
    assert p.stdout == b'{"error": "wrong user name or password"}\n401'
    p = curl(*tls, "-u", f"mallory:{PASSWORDS['alice']}", "-w", "\n%{http_code}",
             f"{base(srv, scheme)}/f.bin")
    assert p.stdout == b'{"error": "wrong user name or password"}\n401'


def test_users_see_only_their_own_docroot(srv: Daemon, tmp_path: Path) -> None:
    bob = f"bob:{PASSWORDS['bob']}"
    p = curl("-u", bob, "-w", "\n%{http_code}", f"{base(srv)}/f.bin")
    assert p.stdout == b'{"error": "/f.bin: no such file"}\n404'
    f = make_file(tmp_path / "b.bin", 777, seed=15)
    p = curl("-T", str(f), "-u", bob, "-w", "\n%{http_code}", f"{base(srv)}/f.bin")
    assert p.stdout == b'{"path": "/f.bin"}\n201'
    assert sha256(srv.docroots["bob"] / "f.bin") == sha256(f)
    assert sha256(srv.docroots["alice"] / "f.bin") != sha256(f)


def test_wrong_password_put_is_refused_before_the_body(srv: Daemon, tmp_path: Path) -> None:
    """``Expect: 100-continue`` is answered only after the credentials check out."""
    f = make_file(tmp_path / "big.bin", 8 << 20, seed=3)
    p = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
         "-H", "Expect: 100-continue", "--expect100-timeout", "10",
         "-u", "alice:wrong", "-T", str(f), srv.url("/up/refused.bin", scheme="http")],
        capture_output=True, text=True, timeout=60, check=True)
    code, uploaded = p.stdout.split()
    assert code == "401"
    assert int(uploaded) < 1 << 20  # the 8 MiB body was not sent
    assert not (srv.docroots["alice"] / "up" / "refused.bin").exists()

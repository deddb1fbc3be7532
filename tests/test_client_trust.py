"""The client trusts nothing that comes off the wire or out of a URL (issue 10, item 5).

* A hostile daemon (a small aiohttp app in this test, speaking the real
  protocol on loopback) answers a download with names that lead outside the
  destination, manifests that are not trees, absurd sizes and malformed
  fields: every variant is refused with a clear error and nothing is written
  anywhere, while a well-formed answer from the same fake downloads fine.
* A raw ``#`` or ``?`` in a URL is a usage error; ``%23`` / ``%3F`` work end to
  end against a real daemon.
* Names POSIX allows (a backslash, a newline, bytes that are not UTF-8, spaces
  at the ends) travel both ways through the control API and plain HTTP, and a
  file that cannot travel is reported in ``skipped_files`` while the rest arrive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fallback.cli import main
from fallback.engine import Options, transfer_async
from fallback.errors import TransferError
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from transport.blocks import envelope as env
from transport.blocks.digest import block_digest, file_digest
from transport.http.framing import CONTENT_TYPE, FrameHeader

BLOCK = 4096
CONTENT = b"written by a hostile daemon\n"
MTIME = 1_700_000_000 * 10**9


# -- a fake daemon ---------------------------------------------------------------------------------
def f(path: object, size: int = len(CONTENT), **kw: Any) -> dict[str, Any]:
    return {"path": path, "kind": "file", "size": size, "mtime_ns": MTIME, "mode": 0o644,
            "block_size": BLOCK, **kw}


def d(path: str) -> dict[str, Any]:
    return {"path": path, "kind": "dir", "mtime_ns": MTIME, "mode": 0o755}


def answer(name: object, entries: object, **extra: Any) -> dict[str, Any]:
    return {"id": "5e55" * 8, "token": "t0ken-Fake_daemon", "name": name, "entries": entries,
            "skipped": [], "streams_max": 4, **extra}


def file_bytes(size: int) -> bytes:
    return (CONTENT * (size // len(CONTENT) + 1))[:size]


class FakeDaemon:
    """Answers the control API with ``opened`` (a dict, or raw bytes / a handler for
    malformed answers) and serves every listed file's blocks, so a client that
    accepts the answer really writes where the manifest says."""

    def __init__(self, opened: dict[str, Any] | bytes | Callable[..., Any],
                 **answers: Any) -> None:
        self.opened = opened
        self.answers = answers  # plan, commit, digests: what those calls answer
        self.queue: list[tuple[int, int]] = []
        self.calls: list[str] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def entries(self) -> list[dict[str, Any]]:
        return self.opened["entries"] if isinstance(self.opened, dict) else []

    async def info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"product": "fallback", "api": 1, "enable_http": True,
                                  "http_port": self.port, "enable_https": False,
                                  "https_port": 1, "udp_port": 0, "udp": False})

    async def open(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("open")
        if callable(self.opened):
            return await self.opened(request)
        if isinstance(self.opened, bytes):
            return web.Response(body=self.opened, content_type="application/json")
        return web.json_response(self.opened)

    async def want(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("want")
        body = await request.json()
        for fi, a, b in body["blocks"]:
            self.queue.extend((fi, k) for k in range(a, b))
        return web.json_response({"queued": len(self.queue)})

    async def blocks(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("blocks")
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        while self.queue:
            fi, b = self.queue.pop(0)
            e = self.entries()[fi]
            data = file_bytes(e["size"])[b * BLOCK:(b + 1) * BLOCK]
            await resp.write(FrameHeader(fi, b, len(data), block_digest(data)).pack() + data)
        await resp.write_eof()
        return resp

    async def digests(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("digests")
        if "digests" in self.answers:
            return web.json_response(self.answers["digests"])
        body = await request.json()
        if "roots" in body:  # the whole-file digests the client checks before publishing
            roots = {}
            for fi in body["roots"]:
                data = file_bytes(self.entries()[fi]["size"])
                roots[str(fi)] = file_digest(BLOCK, len(data), (
                    block_digest(data[k:k + BLOCK]) for k in range(0, len(data), BLOCK)))
            return web.json_response({"roots": roots, "errors": {}})
        return web.json_response({"digests": {}, "root": "b3blocks:" + "00" * 32})

    async def plan(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("plan")
        return web.json_response(self.answers["plan"])

    async def put_blocks(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("put")
        n = len(await request.read())
        return web.json_response({"received": n})

    async def commit(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("commit")
        return web.json_response(self.answers["commit"])

    async def close(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("close")
        return web.json_response({"closed": True})

    async def __aenter__(self) -> FakeDaemon:
        app = web.Application()
        p = "/.fallback/v1"
        app.router.add_get(f"{p}/info", self.info)
        app.router.add_post(f"{p}/session", self.open)
        app.router.add_post(f"{p}/session/{{sid}}/want", self.want)
        app.router.add_post(f"{p}/session/{{sid}}/digests", self.digests)
        app.router.add_get(f"{p}/session/{{sid}}/blocks", self.blocks)
        app.router.add_post(f"{p}/session/{{sid}}/plan", self.plan)
        app.router.add_put(f"{p}/session/{{sid}}/blocks", self.put_blocks)
        app.router.add_post(f"{p}/session/{{sid}}/commit", self.commit)
        app.router.add_delete(f"{p}/session/{{sid}}", self.close)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def url(self, path: str = "/pkg") -> str:
        return f"http://alice@127.0.0.1:{self.port}{path}"


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root``: file bytes, symlink targets, folders (symlinks not followed)."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """tmp/dest (the user's destination, empty) beside tmp/victim_home (must stay untouched)."""
    (tmp_path / "dest").mkdir()
    victim = tmp_path / "victim_home"
    victim.mkdir()
    (victim / ".bashrc").write_text("# the victim's own\n")
    (victim / "target").write_text("a file outside the destination, a different size\n")
    return tmp_path


async def download(fake: FakeDaemon, dst: str, **opts: Any) -> Any:
    o = Options(transport="http", user="alice", password="x", streams=2, **opts)
    return await transfer_async(fake.url(), dst, o)


# -- 1. a hostile download answer -----------------------------------------------------------------
VICTIM = "@VICTIM@"  # replaced by the absolute path of tmp/victim_home


def _huge_total() -> list[dict[str, Any]]:
    return [d("")] + [f(f"f{k}", size=(1 << 22) * BLOCK) for k in range(5)]


HOSTILE: dict[str, tuple[dict[str, Any] | bytes, str]] = {
    # the transfer's name, which becomes the local root under the destination
    "name ../": (answer("../victim_home/.bashrc", [f("")]), "component '..' refused"),
    "name absolute": (answer(VICTIM + "/abs.txt", [f("")]), "absolute path refused"),
    "name ..": (answer("..", [d(""), f("x")]), "component '..' refused"),
    "name .": (answer(".", [d(""), f("x")]), "component '.' refused"),
    "name a/b": (answer("a/b", [d(""), f("x")]), "single path component"),
    "name NUL": (answer("a\x00b", [f("")]), "NUL character"),
    "name not a string": (answer(["x"], [f("")]), "name must be a non-empty string"),
    # entry paths
    "entry ../": (answer("pkg", [d(""), f("../../victim_home/evil")]), "'..' refused"),
    "entry absolute": (answer("pkg", [d(""), f(VICTIM + "/evil")]), "absolute path refused"),
    "entry path not a string": (answer("pkg", [d(""), f(["x"])]), "path must be a string"),
    # the manifest is not a tree
    "no entries": ({k: v for k, v in answer("pkg", []).items() if k != "entries"},
                   "no 'entries' list"),
    "entries not a list": (answer("pkg", {"path": ""}), "no 'entries' list"),
    "empty manifest": (answer("pkg", []), "the manifest is empty"),
    "root not first": (answer("pkg", [f("a")]), "first manifest entry must be the transfer root"),
    "file root with children": (answer("pkg", [f(""), f("a")]), "exactly one manifest entry"),
    "child before its folder": (answer("pkg", [d(""), f("x/y")]), "before its folder 'x'"),
    "duplicate path": (answer("pkg", [d(""), f("a"), f("a")]), "lists 'a' twice"),
    "file inside a file": (answer("pkg", [d(""), f("a"), f("a/b")]), "inside a file"),
    # what the daemon can make the client allocate or choke on
    "huge file": (answer("pkg", [f("", size=1 << 62)]), "size 4611686018427387904 outside"),
    "huge total": (answer("pkg", _huge_total()), "blocks (at most 16777216)"),
    "mtime out of range": (answer("pkg", [f("", mtime_ns=10**30)]), "mtime_ns"),
    "skipped not a list": (answer("pkg", [f("")], skipped=5), "'skipped' is not a list"),
    "skipped not strings": (answer("pkg", [f("")], skipped=[{"a": 1}]), "'skipped' is not a list"),
    "streams_max not a number": (answer("pkg", [f("")], streams_max="many"), "bad streams_max"),
    "no session id": ({k: v for k, v in answer("pkg", [f("")]).items() if k != "id"},
                      "no valid id and token"),
    "token with a header in it": (answer("pkg", [f("")], token="t\r\nX-Evil: 1"),
                                  "no valid id and token"),
    "answer not a JSON object": (b"[1, 2]", "not a JSON object"),
    "answer not JSON": (b"<html>hello</html>", "not valid JSON"),
}


def _resolve(value: Any, victim: str) -> Any:
    if isinstance(value, str):
        return value.replace(VICTIM, victim)
    if isinstance(value, list):
        return [_resolve(v, victim) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, victim) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_download_answer_is_refused(place: Path, case: str) -> None:
    opened, needle = HOSTILE[case]
    opened = _resolve(opened, str(place / "victim_home"))
    before = snapshot(place)
    async with FakeDaemon(opened) as fake:
        with pytest.raises(TransferError) as info:
            await download(fake, str(place / "dest") + "/")
    assert needle in info.value.message, info.value.message
    assert "\n" not in info.value.message
    assert snapshot(place) == before  # nothing written, inside the destination or outside
    assert "blocks" not in fake.calls and "want" not in fake.calls


async def test_answer_larger_than_the_bound_is_refused(place: Path) -> None:
    """A chunked answer without a length that never ends is cut at 64 MiB."""

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        piece = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(80):
                await resp.write(piece)
            await resp.write_eof()
        return resp

    before = snapshot(place)
    async with FakeDaemon(endless) as fake:
        with pytest.raises(TransferError) as info:
            await download(fake, str(place / "dest") + "/")
    assert "answer larger than 67108864 bytes" in info.value.message
    assert snapshot(place) == before


@pytest.mark.parametrize("layout", ["symlink inside the root", "symlink is the root",
                                    "symlink is the file"])
async def test_existing_symlink_does_not_lead_a_download_out(place: Path, layout: str) -> None:
    """dest/pkg/x -> victim_home and an entry x/passwd: refused, nothing reaches victim_home."""
    victim = place / "victim_home"
    dest = place / "dest"
    if layout == "symlink inside the root":
        (dest / "pkg").mkdir()
        (dest / "pkg" / "x").symlink_to(victim)
        opened = answer("pkg", [d(""), d("x"), f("x/passwd")])
        shown = "/pkg/x"
    elif layout == "symlink is the root":
        (dest / "pkg").symlink_to(victim)
        opened = answer("pkg", [d(""), f("passwd")])
        shown = "/pkg"
    else:
        (dest / "pkg").mkdir()
        (dest / "pkg" / "target").symlink_to(victim / "target")
        opened = answer("pkg", [d(""), f("target")])
        shown = "/pkg/target"
    before = snapshot(place)
    async with FakeDaemon(opened) as fake:
        with pytest.raises(TransferError) as info:
            await download(fake, str(dest) + "/")
    assert info.value.message == f"{shown}: refused, it leads outside the destination"
    assert snapshot(place) == before


async def test_decrypted_names_must_not_collide(place: Path) -> None:
    """x and x.fallback-env (decrypted to x) would be two receivers of one file: refused."""
    t = env.EnvelopeTransform.for_upload("a passphrase", len(CONTENT), BLOCK)
    enveloped = f("x" + env.SUFFIX, transform=t.name, header=t.header.hex(), overhead=t.overhead)
    before = snapshot(place)
    async with FakeDaemon(answer("pkg", [d(""), f("x"), enveloped])) as fake:
        with pytest.raises(TransferError) as info:
            await download(fake, str(place / "dest") + "/", decrypt=True,
                           passphrase="a passphrase")
    assert info.value.message == "x: two entries of the download would be written there"
    assert snapshot(place) == before


async def test_well_formed_answer_from_the_fake_downloads(place: Path) -> None:
    """The control case: the fake speaks the protocol, so the refusals above are real."""
    opened = answer("pkg", [d(""), d("sub"), f("sub/a"), f("b\\c", size=3 * BLOCK + 5)],
                    skipped=["odd: skipped by the fake"])
    async with FakeDaemon(opened) as fake:
        result = await download(fake, str(place / "dest") + "/")
    root = place / "dest" / "pkg"
    assert (root / "sub" / "a").read_bytes() == CONTENT
    assert (root / "b\\c").read_bytes() == file_bytes(3 * BLOCK + 5)
    assert result.files == 2
    assert result.skipped_files == {"pkg/odd": "skipped by the fake"}


async def test_hostile_digests_answer_is_refused(place: Path) -> None:
    """overwrite=diff on an existing file of the same size asks for the daemon's digest."""
    (place / "dest" / "pkg").mkdir()
    (place / "dest" / "pkg" / "a").write_bytes(b"x" * len(CONTENT))
    before = snapshot(place)
    async with FakeDaemon(answer("pkg", [d(""), f("a")]), digests=["not", "an", "object"]) as fake:
        with pytest.raises(TransferError) as info:
            await download(fake, str(place / "dest") + "/")
    assert info.value.message == "refused the daemon's digests answer"
    assert snapshot(place) == before


STATE = {"exists": False, "is_dir": False, "size": 0, "mtime_ns": 0, "journal": None, "have": {},
         "root": None}
PLAN_OK = {"missing": {"1": [[0, 1]]}}
UPLOAD_HOSTILE: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "states too short": (answer(None, None, states=[STATE]), {}, "'states' is not a list of 2"),
    "states not a list": (answer(None, None, states={"0": STATE}), {},
                          "'states' is not a list of 2"),
    "plan not an object": (answer(None, None, states=[STATE] * 2), {"plan": [1]},
                           "no 'missing' object"),
    "plan names a file not sent": (answer(None, None, states=[STATE] * 2),
                                   {"plan": {"missing": {"7": [[0, 1]]}}}, "file '7'"),
    "plan range past the file": (answer(None, None, states=[STATE] * 2),
                                 {"plan": {"missing": {"1": [[0, 10**12]]}}},
                                 "file 1: range [0, 1000000000000) outside [0, 1)"),
    "commit missing not blocks": (answer(None, None, states=[STATE] * 2),
                                  {"plan": PLAN_OK, "commit": {"results": {"1": {"missing": ["x"]}}}},
                                  "refused the daemon's commit answer for file 1"),
    "commit error status not a number": (
        answer(None, None, states=[STATE] * 2),
        {"plan": PLAN_OK, "commit": {"results": {"1": {"error": "boom", "status": "bad"}}}},
        "refused the daemon's commit answer for file 1"),
}


@pytest.mark.parametrize("case", list(UPLOAD_HOSTILE))
async def test_hostile_upload_answers_are_refused(tmp_path: Path, case: str) -> None:
    opened, answers, needle = UPLOAD_HOSTILE[case]
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "a").write_bytes(CONTENT)
    before = snapshot(tmp_path)
    async with FakeDaemon(opened, **answers) as fake:
        with pytest.raises(TransferError) as info:
            await transfer_async(str(src), fake.url("/in/"),
                                 Options(transport="http", user="alice", password="x"))
    assert needle in info.value.message, info.value.message
    assert snapshot(tmp_path) == before


async def test_cli_exit_code_and_one_line_for_a_hostile_answer(place: Path) -> None:
    before = snapshot(place)
    async with FakeDaemon(answer("../victim_home/.bashrc", [f("")])) as fake:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fallback", "transfer", fake.url(), str(place / "dest") + "/",
            "--json", "-q", "--transport", "http",
            env={**os.environ, "FALLBACK_PASSWORD": "x"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: refused the daemon's manifest: ")
    assert json.loads(out.decode().splitlines()[-1])["ok"] is False
    assert snapshot(place) == before


# -- 2. '#' and '?' in URLs -------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str]:
    """``fallback`` in this process (a usage error never reaches the network)."""
    err = io.StringIO()
    saved = os.environ.get("FALLBACK_PASSWORD")
    os.environ["FALLBACK_PASSWORD"] = PASSWORDS["alice"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(list(args))
    finally:
        if saved is None:
            os.environ.pop("FALLBACK_PASSWORD", None)
        else:
            os.environ["FALLBACK_PASSWORD"] = saved
    return rc, err.getvalue()


@pytest.mark.parametrize("name,code", [("report#2.txt", "%23"), ("a?b", "%3F")])
def test_raw_hash_or_question_mark_in_url_is_a_usage_error(daemon: Daemon, tmp_path: Path,
                                                           name: str, code: str) -> None:
    local = tmp_path / name
    local.write_text("quarterly numbers\n")
    (daemon.docroots["alice"] / "hs").mkdir()
    (daemon.docroots["alice"] / "hs" / name).write_text("on the daemon\n")
    before_remote = snapshot(daemon.docroots["alice"])
    fp = ["--fingerprint", daemon.fingerprint, "-q"]
    rc, err = cli("transfer", str(local), daemon.url(f"/hs/{name}"), *fp)
    assert rc == 2, err
    assert code in err and "error: bad URL" in err and len(err.strip().splitlines()) == 1
    assert snapshot(daemon.docroots["alice"]) == before_remote  # /hs/report not written
    down = tmp_path / "down"
    down.mkdir()
    rc, err = cli("transfer", daemon.url(f"/hs/{name}"), str(down) + "/", *fp)
    assert rc == 2, err
    assert code in err
    assert list(down.iterdir()) == []


def test_percent_encoded_hash_and_question_mark_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    for name, encoded in (("report#2.txt", "report%232.txt"), ("a?b", "a%3Fb")):
        local = make_file(tmp_path / "up" / name, 10_000, seed=len(name))
        _, res, _ = daemon.transfer(str(local), daemon.url(f"/hs/{encoded}"))
        assert res["ok"] is True
        remote = daemon.docroots["alice"] / "hs" / name
        assert sha256(remote) == sha256(local)
        back = tmp_path / "back"
        back.mkdir(exist_ok=True)
        _, res, _ = daemon.transfer(daemon.url(f"/hs/{encoded}"), str(back) + "/")
        assert res["ok"] is True
        assert sha256(back / name) == sha256(local)
    assert sorted(os.listdir(daemon.docroots["alice"] / "hs")) == ["a?b", "report#2.txt"]


# -- 3. names POSIX allows ---------------------------------------------------------------------------
ODD_NAMES = [b"scan\\2024.jpg", b"line\nbreak.txt", b"bad\xff\xfename.bin", b" spaced ",
             b"normal.txt"]


def listing(root: Path) -> dict[bytes, bytes | None]:
    """Relative path (bytes, as the file system has it) -> content, None for folders."""
    out: dict[bytes, bytes | None] = {}
    broot = os.fsencode(root)
    for dirpath, dirs, files in os.walk(broot):
        for n in dirs:
            out[os.path.relpath(os.path.join(dirpath, n), broot)] = None
        for n in files:
            path = os.path.join(dirpath, n)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                out[os.path.relpath(path, broot)] = b"(not a regular file)"
                continue
            with open(path, "rb") as fh:
                out[os.path.relpath(path, broot)] = fh.read()
    return out


def odd_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for k, n in enumerate(ODD_NAMES):
        with open(os.fsencode(root) + b"/" + n, "wb") as fh:
            fh.write(n * (k * 1000 + 1))
    sub = os.fsencode(root) + b"/sub\\dir \xe9"
    os.mkdir(sub)
    with open(sub + b"/inner\\file", "wb") as fh:
        fh.write(b"inner")
    return root


def test_odd_names_upload_and_download(daemon: Daemon, tmp_path: Path) -> None:
    src = odd_folder(tmp_path / "scan")
    _, res, _ = daemon.transfer(str(src), daemon.url("/in/"))
    assert res["ok"] is True and res["skipped_files"] == {}
    assert res["files"] == len(ODD_NAMES) + 1
    assert listing(daemon.docroots["alice"] / "in" / "scan") == listing(src)
    back = tmp_path / "back"
    back.mkdir()
    _, res, _ = daemon.transfer(daemon.url("/in/scan"), str(back) + "/")
    assert res["ok"] is True and res["skipped_files"] == {}
    assert listing(back / "scan") == listing(src)
    assert "scan/bad\udcff\udcfename.bin" in res["checksums"]


def _plain(daemon: Daemon, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
    auth = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{daemon.http_port}{path}", data=data,
                                 method=method, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_plain_http_and_control_api_agree_on_names(daemon: Daemon, tmp_path: Path) -> None:
    """A plain PUT of %FF writes the byte 0xFF (not a file named '%FF'), and what one path
    wrote the other reads."""
    alice = os.fsencode(daemon.docroots["alice"])
    assert _plain(daemon, "PUT", "/plain/bad%FF.bin", b"via PUT")[0] == 201
    assert _plain(daemon, "PUT", "/plain/scan%5C2024.jpg", b"backslash")[0] == 201
    assert sorted(os.listdir(alice + b"/plain")) == [b"bad\xff.bin", b"scan\\2024.jpg"]
    down = tmp_path / "down"
    down.mkdir()
    _, res, _ = daemon.transfer(daemon.url("/plain"), str(down) + "/")
    assert res["ok"] is True and res["skipped_files"] == {}
    assert listing(down / "plain") == {b"bad\xff.bin": b"via PUT", b"scan\\2024.jpg": b"backslash"}
    src = odd_folder(tmp_path / "odd")
    daemon.transfer(str(src), daemon.url("/ctl/"))
    assert _plain(daemon, "GET", "/ctl/odd/bad%FF%FEname.bin") == (200, ODD_NAMES[2] * 2001)
    assert _plain(daemon, "GET", "/ctl/odd/line%0Abreak.txt") == (200, ODD_NAMES[1] * 1001)
    assert _plain(daemon, "GET", "/ctl/odd/sub%5Cdir%20%E9/inner%5Cfile") == (200, b"inner")


def test_a_file_that_cannot_travel_is_skipped_with_a_reason(daemon: Daemon, tmp_path: Path) -> None:
    """Upload: a FIFO in the folder is reported in skipped_files and everything else arrives."""
    src = odd_folder(tmp_path / "scan")
    os.mkfifo(src / "pipe")
    _, res, _ = daemon.transfer(str(src), daemon.url("/in/"))
    assert res["ok"] is True
    assert res["skipped_files"] == {"scan/pipe": "not a regular file"}
    got = listing(daemon.docroots["alice"] / "in" / "scan")
    assert got == {k: v for k, v in listing(src).items() if k != b"pipe"}


def test_names_are_shown_as_text_on_a_terminal(daemon: Daemon, tmp_path: Path) -> None:
    """The progress bar shows 'pkg/x[/]y' as text: rich markup in a name (a folder 'x['
    holding ']y') made the bar raise MarkupError and the transfer fail on a terminal."""
    import pty

    src = tmp_path / "pkg"
    make_file(src / "x[" / "]y", 300_000, seed=5)
    make_file(src / "line\nbreak", 1000, seed=6)
    master, slave = pty.openpty()
    shown = bytearray()

    def drain() -> None:  # a pty holds only a few KiB: read while the child writes
        with contextlib.suppress(OSError):  # EIO once the child's side is closed
            while chunk := os.read(master, 1 << 16):
                shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(
            daemon.cli_args("transfer", str(src), daemon.url("/in/")),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, timeout=120,
            env={**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]})
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    assert p.returncode == 0, shown.decode(errors="replace")
    assert b"Traceback" not in shown and b"MarkupError" not in shown
    assert (daemon.docroots["alice"] / "in" / "pkg" / "x[" / "]y").exists()


@pytest.mark.parametrize("entries,needle", [
    ([d(""), f("x/y")], "manifest lists 'x/y' before its folder 'x'"),
    ([d(""), f("a"), f("a")], "manifest lists 'a' twice"),
    ([d(""), f("a"), f("a/b")], "manifest puts 'a/b' inside a file"),
    ([f(""), f("a")], "a file transfer has exactly one manifest entry"),
])
def test_daemon_refuses_an_upload_manifest_that_is_not_a_tree(daemon: Daemon, entries: list[Any],
                                                               needle: str) -> None:
    """The daemon checks a client's manifest as the client checks the daemon's."""
    body = json.dumps({"direction": "upload", "path": "/up/", "into_dir": True, "name": "pkg",
                       "entries": entries, "overwrite": "diff"}).encode()
    status, raw = _plain(daemon, "POST", "/.fallback/v1/session", body)
    assert (status, json.loads(raw)) == (400, {"error": needle})
    assert not (daemon.docroots["alice"] / "up").exists()

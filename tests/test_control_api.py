"""The session control API against hostile and mistaken callers (issue #10).

Raw aiohttp requests to a real daemon subprocess: malformed bodies on every
endpoint (400 with a specific message, never a 500), ranges and sizes that
would make the daemon allocate or loop without bound, calls that do not fit
the session's direction or the user's rights (re-read from the configuration
on every call, so a SIGHUP takes effect at once), tokens that are not the
session's, and the server's ``overwrite=deny`` against every client policy.
After each hostile call the docroot is compared with a listing taken before
(hidden files included): a refused call leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, make_file, sha256
from tests.control_client import (
    BS,
    PERMS,
    SIZE,
    T0,
    Api,
    Sess,
    entry,
    frames,
    listing,
    parse_frames,
    password,
    reload,
    start_daemon,
)
from tests.statefiles import ours
from transport.blocks.manifest import MAX_ENTRIES, entries_from_json
from transport.errors import ProtocolError


@pytest.fixture(scope="module")
def cd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("control") / "daemon", {"alice": (True, True),
                                                                      "bob": (True, True)})
    make_file(d.docroots["alice"] / "victim.bin", SIZE, seed=1)
    yield d
    d.stop(signal.SIGKILL)


def log_mark(d: Daemon) -> int:
    return len(d.log())


def assert_log_clean(d: Daemon, mark: int = 0) -> None:
    """No internal error or traceback in the daemon's log since ``mark``."""
    log = d.log()[mark:]
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


async def upload_session(api: Api, user: str, name: str, entries: list[dict[str, Any]] | None = None,
                         **kw: Any) -> Sess:
    return await api.open(user, {"direction": "upload", "path": f"/{name}", "into_dir": False,
                                 "name": "", "entries": entries or [entry()], "overwrite": "always",
                                 "encrypt": False, "strong_pass": False, **kw})


# -- 1. unbounded work from one control call -----------------------------------------------------
async def test_huge_want_is_refused_at_once_and_nothing_is_queued(cd: Daemon, api_for: Any) -> None:
    """``want [[0, 0, 10**10]]`` pinned the event loop expanding ten billion items; a range
    outside the file is refused before anything is queued, even after good ones."""
    mark = log_mark(cd)
    api = api_for(cd)
    s = await api.open("alice", {"direction": "download", "path": "/victim.bin"})
    t = time.monotonic()
    for blocks in ([[0, 0, 10**10]], [[0, 0, 1], [0, 0, 2**62]], [[0, 0, 4]]):
        r = await api.call(s, "POST", "/want", {"blocks": blocks})
        assert r.status == 400 and "out of range for file 0 (3 blocks)" in r.error, (blocks, r.error)
    assert time.monotonic() - t < 5
    got = await api.call(s, "GET", "/blocks")
    assert got.status == 200 and got.body == b""  # nothing was queued by the refused calls
    # Overlapping ranges are queued once; the feed hands blocks out in order.
    r = await api.call(s, "POST", "/want", {"blocks": [[0, 1, 3], [0, 0, 2]]})
    assert r.status == 200 and r.json == {"queued": 4}
    got = await api.call(s, "GET", "/blocks")
    assert parse_frames(got.body) == [(0, 0), (0, 1), (0, 2)]
    assert (await api.call(s, "DELETE", "", {})).status == 200
    assert_log_clean(cd, mark)


async def test_largest_file_plans_as_one_range_and_larger_is_refused(cd: Daemon, api_for: Any) -> None:
    """A plan for 2**50 bytes in 4 KiB blocks (2**38 blocks) answers one range at once; a
    size past the bound (2**62 made the daemon build a list of 2**40 ints) is a 400."""
    mark = log_mark(cd)
    api = api_for(cd)
    root = cd.docroots["alice"]
    before = listing(root)
    t = time.monotonic()
    r = await api.open_raw("alice", json.dumps({
        "direction": "upload", "path": "/huge.bin", "entries": [entry(size=2**62, block_size=4096)],
    }).encode())
    assert r.status == 400 and "size" in r.error and "outside [0, 1125899906842624]" in r.error
    assert listing(root) == before
    s = await upload_session(api, "alice", "huge.bin", [entry(size=2**50, block_size=4096)])
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    assert r.status == 200, r.error
    assert r.json["missing"] == {"0": [[0, 2**38]]}
    r = await api.call(s, "POST", "/commit", {"files": [{"file": 0, "root": None}]})
    assert r.status == 200 and r.json["results"] == {"0": {"missing": [[0, 2**38]]}}
    assert time.monotonic() - t < 10
    assert (await api.call(s, "DELETE", "", {})).status == 200
    assert not (root / "huge.bin").exists()
    partial, journal = ours(root / "huge.bin", root)
    assert partial.stat().st_blocks == 0  # nothing was allocated on disk either
    partial.unlink()
    journal.unlink()
    assert_log_clean(cd, mark)


async def test_sender_queues_ranges_and_leases_blocks_in_order(tmp_path: Path) -> None:
    """The sender's scheduler spans files of 3, 0 and 2 blocks: the empty file is never
    leased, a dead path's block comes out again first, refused requests queue nothing,
    and an acknowledged block is sent again only when the receiver asks for it again."""
    from concurrent.futures import ThreadPoolExecutor

    from transport.blocks.session import BlockSender
    from transport.blocks.source import FileSource, entry_for

    sizes = {0: SIZE, 1: 0, 2: BS + 1}
    srcs = {i: FileSource(p, entry_for(p, "", BS)) for i, n in sizes.items()
            for p in [make_file(tmp_path / f"{i}.bin", n, seed=i)]}
    pool = ThreadPoolExecutor(1)
    sender = BlockSender(srcs, pool)

    def blocks(leases: list[Any]) -> list[tuple[int, int] | None]:
        return [(x.file, x.block) if x is not None else None for x in leases]

    with pytest.raises(ProtocolError, match=r"\[0, 1\) out of range for file 1 \(0 blocks\)"):
        sender.add_ranges([(0, 0, 3), (1, 0, 1)])
    assert not sender.pending and sender.done  # nothing of a refused request was queued
    assert sender.add_ranges([(2, 0, 2), (0, 0, 3), (0, 1, 2)]) == 6 and sender.pending
    a = [sender.lease("a"), sender.lease("a")]
    assert blocks(a) == [(0, 0), (0, 1)]
    data, digest = await sender.read(a[0])
    assert len(data) == BS and digest is not None
    sender.delivered(a[0])
    assert sender.drop_path("a") == 2  # the path died: both come back, in order, first
    assert blocks([sender.lease("b") for _ in range(6)]) == [(0, 0), (0, 1), (0, 2), (2, 0),
                                                              (2, 1), None]
    for f, b in [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]:
        sender.ack(f, b)
    assert sender.done and not sender.pending
    sender.add_ranges([(0, 1, 2)])  # the receiver lost it after all: sent again
    assert blocks([sender.lease("b"), sender.lease("b")]) == [(0, 1), None]
    sender.close()
    pool.shutdown()


def test_manifest_entry_count_is_bounded() -> None:
    """``MAX_ENTRIES`` is checked on the list's length, before any entry is parsed."""
    t = time.monotonic()
    with pytest.raises(ProtocolError, match=f"more than {MAX_ENTRIES}"):
        entries_from_json([{"path": "", "kind": "dir"}] * (MAX_ENTRIES + 1))
    assert time.monotonic() - t < 1


DEEP = b"[" * 100_000 + b"]" * 100_000
OPEN_CASES: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not-json", b"xyz", "not valid JSON"),
    ("string", b'"xyz"', "must be a JSON object"),
    ("nested", DEEP, "nested too deeply"),
    ("nested-in-object", b'{"direction": ' + DEEP + b"}", "nested too deeply"),
    ("huge-int", b'{"x": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("direction", {"direction": "sideways"}, "direction must be 'upload' or 'download'"),
    ("no-entries", {"direction": "upload", "path": "/x"}, "'entries'"),
    ("entries-string", {"direction": "upload", "entries": "xyz"}, "entries must be a non-empty list"),
    ("entries-empty", {"direction": "upload", "entries": []}, "entries must be a non-empty list"),
    ("entry-not-object", {"direction": "upload", "entries": [1]}, "entry must be an object"),
    ("entry-no-kind", {"direction": "upload", "entries": [{"path": ""}]}, "needs 'path' and 'kind'"),
    ("mode-2**70", {"direction": "upload", "entries": [entry(mode=2**70)]}, "mode (huge) outside"),
    ("size-float", {"direction": "upload", "entries": [entry(size=1.0)]}, "size must be an integer"),
    ("size-bool", {"direction": "upload", "entries": [entry(size=True)]}, "size must be an integer"),
    ("size-string", {"direction": "upload", "entries": [entry(size="10")]}, "size must be an integer"),
    ("size-negative", {"direction": "upload", "entries": [entry(size=-1)]}, "size -1 outside"),
    ("mtime-2**64", {"direction": "upload", "entries": [entry(mtime_ns=2**64)]}, "mtime_ns"),
    ("block-size", {"direction": "upload", "entries": [entry(block_size=5)]}, "block_size 5 outside"),
    ("transform", {"direction": "upload", "entries": [entry(transform="rot13")]},
     "unknown transform 'rot13'"),
    ("kind-list", {"direction": "upload", "entries": [entry(kind=[[1]])]}, "unknown kind of type list"),
    ("header-plain", {"direction": "upload", "entries": [entry(header="00")]}, "no header or overhead"),
    ("name-too-long", {"direction": "upload", "entries": [{"path": "", "kind": "dir"},
                                                           entry("a" * 300)]}, "longer than 255"),
    ("duplicate", {"direction": "upload", "entries": [{"path": "", "kind": "dir"}, entry("a"),
                                                       entry("a")]}, "lists 'a' twice"),
    ("no-parent", {"direction": "upload", "entries": [{"path": "", "kind": "dir"}, entry("d/a")]},
     "before its folder 'd'"),
    ("under-a-file", {"direction": "upload", "entries": [entry(), entry("a")]},
     "a file transfer has exactly one manifest entry"),
    ("root-not-first", {"direction": "upload", "entries": [entry("a")]}, "the first manifest entry must be the transfer root"),
    ("into-dir-string", {"direction": "upload", "entries": [entry()], "into_dir": "yes"},
     "into_dir must be true or false"),
    ("overwrite", {"direction": "upload", "entries": [entry()], "overwrite": "sometimes"},
     "unknown overwrite policy 'sometimes'"),
    ("overwrite-number", {"direction": "upload", "entries": [entry()], "overwrite": 1},
     "overwrite must be a string"),
    ("path-number", {"direction": "download", "path": 123}, "path must be a string"),
]


@pytest.mark.parametrize("body,message", [c[1:] for c in OPEN_CASES], ids=[c[0] for c in OPEN_CASES])
async def test_malformed_open_is_a_400(cd: Daemon, api_for: Any, body: Any, message: str) -> None:
    mark = log_mark(cd)
    api = api_for(cd)
    before = listing(cd.docroots["alice"])
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await api.open_raw("alice", raw)
    assert (r.status, message in r.error) == (400, True), (r.status, r.error)
    assert listing(cd.docroots["alice"]) == before
    assert_log_clean(cd, mark)


SESSION_CASES: list[tuple[str, str, str, bytes | dict[str, Any], str]] = [
    # (id, session kind, endpoint, body, message)
    ("plan-not-json", "upload", "plan", b"xyz", "not valid JSON"),
    ("plan-string", "upload", "plan", b'"xyz"', "must be a JSON object, not a string"),
    ("plan-nested", "upload", "plan", DEEP, "nested too deeply"),
    ("plan-no-files", "upload", "plan", {}, "plan: missing 'files'"),
    ("plan-files-string", "upload", "plan", {"files": "xyz"}, "files must be a list"),
    ("plan-item-int", "upload", "plan", {"files": [1]}, "plan item 0 must be an object"),
    ("plan-no-file", "upload", "plan", {"files": [{"action": "fresh"}]}, "missing 'file'"),
    ("plan-no-action", "upload", "plan", {"files": [{"file": 0}]}, "missing 'action'"),
    ("plan-file-float", "upload", "plan", {"files": [{"file": 0.0, "action": "fresh"}]},
     "file must be an integer, not a number with a fraction"),
    ("plan-file-bool", "upload", "plan", {"files": [{"file": False, "action": "fresh"}]},
     "file must be an integer, not a boolean"),
    ("plan-file-2**70", "upload", "plan", {"files": [{"file": 2**70, "action": "fresh"}]},
     "file a huge number outside"),
    ("plan-file-unknown", "upload", "plan", {"files": [{"file": 9, "action": "fresh"}]},
     "unknown file index 9"),
    ("plan-action", "upload", "plan", {"files": [{"file": 0, "action": "explode"}]},
     "unknown action 'explode'"),
    ("plan-twice", "upload", "plan", {"files": [{"file": 0, "action": "fresh"},
                                                {"file": 0, "action": "skip"}]}, "named twice"),
    ("plan-entry-changed", "upload", "plan",
     {"files": [{"file": 0, "action": "fresh", "entry": entry(size=SIZE + 1)}]},
     "entry changed between open and plan"),
    ("plan-entry-mode", "upload", "plan",
     {"files": [{"file": 0, "action": "fresh", "entry": entry(mode=2**70)}]}, "mode (huge)"),
    ("plan-drop-fresh", "upload", "plan",
     {"files": [{"file": 0, "action": "fresh", "drop": [[0, 1]]}]},
     "rebase and drop go with action 'resume' only"),
    ("plan-rebase-int", "upload", "plan",
     {"files": [{"file": 0, "action": "resume", "rebase": 1}]}, "rebase must be true or false"),
    ("plan-drop-triple", "upload", "plan",
     {"files": [{"file": 0, "action": "resume", "drop": [[0, 1, 2]]}]}, "must be [start, stop]"),
    ("plan-drop-empty", "upload", "plan",
     {"files": [{"file": 0, "action": "resume", "drop": [[3, 3]]}]}, "empty range [3, 3)"),
    ("plan-drop-many", "upload", "plan",
     {"files": [{"file": 0, "action": "resume", "drop": [[2 * k, 2 * k + 1]
                                                         for k in range(65_537)]}]},
     "drop"),
    ("commit-not-json", "upload", "commit", b"{", "not valid JSON"),
    ("commit-file-string", "upload", "commit", {"files": [{"file": "0"}]},
     "file must be an integer, not a string"),
    ("commit-root-int", "upload", "commit", {"files": [{"file": 0, "root": 5}]},
     "root must be a string"),
    ("commit-item-list", "upload", "commit", {"files": [[0]]}, "commit item 0 must be an object"),
    ("digests-no-file", "download", "digests", {"blocks": []}, "digests: missing 'file'"),
    ("digests-block-float", "download", "digests", {"file": 0, "blocks": [1.5]},
     "block 0 must be an integer"),
    ("digests-block-range", "download", "digests", {"file": 0, "blocks": [10**6]},
     "block 1000000 out of range for file 0 (3 blocks)"),
    ("digests-root-string", "download", "digests", {"file": 0, "root": "yes"},
     "root must be true or false"),
    ("digests-file-unknown", "download", "digests", {"file": 5}, "unknown file index 5"),
    ("want-int", "download", "want", {"blocks": [1]}, "item 0 must be [file, start, stop]"),
    ("want-string", "download", "want", b'"xyz"', "must be a JSON object"),
    ("want-nested", "download", "want", DEEP, "nested too deeply"),
    ("want-missing", "download", "want", {}, "want: missing 'blocks'"),
    ("want-float", "download", "want", {"blocks": [[0, 0.0, 1]]}, "start must be an integer"),
    ("want-bool", "download", "want", {"blocks": [[True, 0, 1]]}, "file must be an integer"),
    ("want-negative", "download", "want", {"blocks": [[0, -1, 1]]}, "start -1 outside"),
    ("want-empty", "download", "want", {"blocks": [[0, 2, 2]]}, "empty range [2, 2)"),
    ("want-file", "download", "want", {"blocks": [[7, 0, 1]]}, "unknown file index 7"),
    ("close-not-json", "download", "", b"xyz", "not valid JSON"),
    ("close-error-int", "upload", "", {"error": 5}, "error must be a string"),
]


@pytest.mark.parametrize("kind,endpoint,body,message", [c[1:] for c in SESSION_CASES],
                         ids=[c[0] for c in SESSION_CASES])
async def test_malformed_session_call_is_a_400(cd: Daemon, api_for: Any, kind: str, endpoint: str,
                                               body: Any, message: str) -> None:
    """Every control endpoint parses its body strictly; a bad one changes nothing: the
    session then still plans (or queues) and commits (or sends) normally."""
    mark = log_mark(cd)
    api = api_for(cd)
    root = cd.docroots["alice"]
    name = f"m-{hashlib.sha1(repr(body).encode()).hexdigest()[:8]}.bin"
    if kind == "upload":
        s = await upload_session(api, "alice", name)
    else:
        s = await api.open("alice", {"direction": "download", "path": "/victim.bin"})
    before = listing(root)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    method = "DELETE" if endpoint == "" else "POST"
    r = await api.call(s, method, f"/{endpoint}" if endpoint else "", raw)
    assert (r.status, message in r.error) == (400, True), (r.status, r.error)
    assert listing(root) == before
    data = make_file(cd.base / name, SIZE, seed=7).read_bytes()
    if kind == "upload":  # the session is intact: a normal upload still works
        r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
        assert r.status == 200 and r.json["missing"] == {"0": [[0, 3]]}, r.error
        body_, root_digest = frames(data)
        assert (await api.call(s, "PUT", "/blocks", body_)).status == 200
        r = await api.call(s, "POST", "/commit", {"files": [{"file": 0, "root": root_digest}]})
        assert r.json["results"]["0"] == {"ok": True, "root": root_digest}
        assert (root / name).read_bytes() == data
        (root / name).unlink()
    else:
        assert (await api.call(s, "POST", "/want", {"blocks": [[0, 0, 3]]})).json == {"queued": 3}
        got = await api.call(s, "GET", "/blocks")
        assert parse_frames(got.body) == [(0, 0), (0, 1), (0, 2)]
    assert (await api.call(s, "DELETE", "", {})).status == 200
    assert_log_clean(cd, mark)


async def test_a_session_is_planned_once(cd: Daemon, api_for: Any) -> None:
    """A second plan was accepted for other files and replaced the first one's receivers,
    which kept their journal locks until the daemon exited: the first plan's files stayed
    locked for every later session. Now it is a 409, and a later session plans them."""
    api = api_for(cd)
    tree = [{"path": "", "kind": "dir", "mtime_ns": T0, "mode": 0o755}, entry("a"), entry("b")]
    s = await upload_session(api, "alice", "twice", tree)
    assert (await api.call(s, "POST", "/plan", {"files": [{"file": 1, "action": "fresh"}]})).status == 200
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 2, "action": "fresh"}]})
    assert (r.status, r.error) == (409, "the upload is planned already")
    assert (await api.call(s, "DELETE", "", {})).status == 200
    s = await upload_session(api, "alice", "twice", tree)
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 1, "action": "fresh"},
                                                      {"file": 2, "action": "fresh"}]})
    assert (r.status, r.json.get("missing")) == (200, {"1": [[0, 3]], "2": [[0, 3]]}), r.error
    assert (await api.call(s, "DELETE", "", {})).status == 200


# -- 2. direction and permissions, on every endpoint ---------------------------------------------
ENDPOINTS = [("plan", "upload"), ("PUT blocks", "upload"), ("commit", "upload"),
             ("digests", "download"), ("want", "download"), ("GET blocks", "download"),
             ("close", None)]


def expected(perm: str, kind: str, endpoint_kind: str | None) -> int:
    read, write = PERMS[perm]
    if endpoint_kind is None:
        return 200  # closing a session is always allowed (it only checkpoints and unlocks)
    if endpoint_kind != kind:
        return 409
    return 200 if (write if kind == "upload" else read) else 403


async def try_endpoint(api: Api, s: Sess, endpoint: str, payload: bytes, root_digest: str) -> int:
    if endpoint == "plan":
        r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    elif endpoint == "PUT blocks":
        r = await api.call(s, "PUT", "/blocks", payload)
    elif endpoint == "commit":
        r = await api.call(s, "POST", "/commit", {"files": [{"file": 0, "root": root_digest}]})
        if r.status == 200:
            assert r.json["results"]["0"].get("ok") is True, r.json
    elif endpoint == "digests":
        r = await api.call(s, "POST", "/digests", {"file": 0, "blocks": [0], "root": True})
    elif endpoint == "want":
        r = await api.call(s, "POST", "/want", {"blocks": [[0, 0, 3]]})
    elif endpoint == "GET blocks":
        r = await api.call(s, "GET", "/blocks")
        if r.status == 200:
            assert parse_frames(r.body) == [(0, 0), (0, 1), (0, 2)]
    else:
        r = await api.call(s, "DELETE", "", {})
    if r.status != 200:
        assert r.error, (endpoint, r.status)  # every refusal says why
    return r.status


async def test_every_endpoint_every_session_kind_every_permission(
        tmp_path: Path, api_for: Any) -> None:
    """The table: users read-only, write-only and read-write; upload and download sessions;
    every endpoint. A call for the other direction is a 409, a call the user may not make
    (rights re-read after a SIGHUP) a 403, and a refused call writes nothing: a read-only
    user's download session cannot plan, send blocks to or commit over the file it reads."""
    all_rw = {u: (True, True) for u in PERMS}
    d = start_daemon(tmp_path / "daemon", all_rw)
    try:
        api = api_for(d)
        payload_data = make_file(tmp_path / "evil.bin", SIZE, seed=666).read_bytes()
        payload, root_digest = frames(payload_data)
        for u in PERMS:
            make_file(d.docroots[u] / "victim.bin", SIZE, seed=1)
        victim = sha256(d.docroots["ro"] / "victim.bin")
        # Sessions opened while everyone may do everything, for the cells whose rights are
        # revoked later: the daemon must re-check them on every call.
        early = {(u, k): await (upload_session(api, u, f"up-{k}.bin") if k == "upload" else
                                api.open(u, {"direction": "download", "path": "/victim.bin"}))
                 for u in PERMS for k in ("upload", "download")}
        reload(d, PERMS)
        table: dict[tuple[str, str, str], int] = {}
        want: dict[tuple[str, str, str], int] = {}
        leaks: dict[tuple[str, str], Any] = {}
        for u in PERMS:
            for kind in ("upload", "download"):
                body = ({"direction": "upload", "path": f"/up-{kind}.bin", "entries": [entry()],
                         "overwrite": "always"} if kind == "upload"
                        else {"direction": "download", "path": "/victim.bin"})
                r = await api.open_raw(u, json.dumps(body).encode())
                allowed = PERMS[u][1] if kind == "upload" else PERMS[u][0]
                table[(u, kind, "open")] = r.status
                want[(u, kind, "open")] = 200 if allowed else 403
                s = Sess(r.json["id"], r.json["token"]) if r.status == 200 else early[(u, kind)]
                if r.status == 200:
                    await api.call(early[(u, kind)], "DELETE", "", {})
                before = listing(d.docroots[u])
                for endpoint, ekind in ENDPOINTS:
                    table[(u, kind, endpoint)] = await try_endpoint(api, s, endpoint, payload,
                                                                    root_digest)
                    want[(u, kind, endpoint)] = expected(u, kind, ekind)
                after = listing(d.docroots[u])
                if kind == "upload" and PERMS[u][1]:  # the one row that writes: exactly its file
                    assert (d.docroots[u] / f"up-{kind}.bin").read_bytes() == payload_data
                    after.pop(f"up-{kind}.bin")
                changed = {k: after.get(k) for k in set(before) | set(after)
                           if before.get(k) != after.get(k)}
                if changed or sha256(d.docroots[u] / "victim.bin") != victim:
                    leaks[(u, kind)] = changed
        wrong = {cell: (table[cell], want[cell]) for cell in want if table[cell] != want[cell]}
        assert (wrong, leaks) == ({}, {}), "cells (user, session, endpoint): (got, expected); " \
                                           "(user, session): docroot changes"
        assert_log_clean(d)
    finally:
        d.stop(signal.SIGKILL)


async def test_a_token_not_the_sessions_is_401_on_every_endpoint(cd: Daemon, api_for: Any) -> None:
    """The token is bound to its session: none, a wrong one, or another user's session's
    token is refused (401) on every endpoint before anything happens."""
    mark = log_mark(cd)
    api = api_for(cd)
    root = cd.docroots["alice"]
    up = await upload_session(api, "alice", "tok.bin")
    down = await api.open("alice", {"direction": "download", "path": "/victim.bin"})
    bobs = await api.open("bob", {"direction": "download", "path": "/"})
    payload, digest = frames(b"x" * SIZE)
    before = listing(root)
    for s in (up, down):
        for token in ("", "wrong-token", bobs.token, (down if s is up else up).token):
            for method, suffix, body in [("POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]}),
                                         ("PUT", "/blocks", payload),
                                         ("POST", "/commit", {"files": [{"file": 0, "root": digest}]}),
                                         ("POST", "/digests", {"file": 0, "blocks": [0]}),
                                         ("POST", "/want", {"blocks": [[0, 0, 1]]}),
                                         ("GET", "/blocks", None), ("DELETE", "", {})]:
                r = await api.call(s, method, suffix, body, token=token)
                assert (r.status, r.error) == (401, "session token refused"), (method, suffix)
    assert listing(root) == before
    # The sessions were not harmed: their own tokens still work.
    assert (await api.call(down, "POST", "/want", {"blocks": [[0, 0, 1]]})).status == 200
    for s in (up, down, bobs):
        assert (await api.call(s, "DELETE", "", {})).status == 200
    assert_log_clean(cd, mark)


# -- 3. the server's overwrite=deny wins ------------------------------------------------------------
@pytest.fixture(scope="module")
def deny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("deny") / "daemon", {"alice": (True, True)},
                     "<overwrite>deny</overwrite>")
    yield d
    d.stop(signal.SIGKILL)


def run_alice(d: Daemon, *args: str) -> tuple[int, dict[str, Any], str]:
    return d.transfer(*args, password=password("alice"), check=False)


@pytest.mark.parametrize("policy", [["--overwrite", "always"], [], ["--overwrite", "older"]],
                         ids=["always", "diff-default", "older"])
def test_overwrite_deny_keeps_existing_files_whatever_the_client_asks(
        deny: Daemon, tmp_path: Path, policy: list[str]) -> None:
    """``file_system/overwrite=deny``: a tree upload writes its new file and refuses the
    existing one, which the result lists in ``skipped_files`` with the server's reason."""
    mark = log_mark(deny)
    tag = "-".join(policy) or "default"
    remote = deny.docroots["alice"] / f"t-{tag}"
    kept = make_file(remote / "old.bin", SIZE, seed=2)
    os.utime(kept, ns=(T0 - 10**12, T0 - 10**12))  # older than the source: "older" would replace
    old = sha256(kept)
    local = tmp_path / f"t-{tag}"
    make_file(local / "old.bin", SIZE, seed=3)  # same size, other bytes: "diff" would send it
    make_file(local / "new.bin", SIZE, seed=4)
    os.utime(local / "old.bin", ns=(T0, T0))
    before = listing(deny.docroots["alice"])
    rc, res, err = run_alice(deny, str(local), deny.url("/"), "--block-size", "64K", *policy)
    assert (rc, res["ok"]) == (0, True), err
    assert res["skipped_files"] == {
        f"t-{tag}/old.bin": "refused by the server: exists, and the server does not overwrite "
                            "(file_system/overwrite=deny)"}
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE, SIZE)
    assert sha256(kept) == old and kept.stat().st_mtime_ns == T0 - 10**12
    assert sha256(remote / "new.bin") == sha256(local / "new.bin")
    after = listing(deny.docroots["alice"])
    assert set(after) - set(before) == {f"t-{tag}/new.bin"}  # no partial, no journal left
    assert_log_clean(deny, mark)


async def test_overwrite_deny_commit_never_replaces_a_file_that_appeared(
        deny: Daemon, api_for: Any) -> None:
    """The last line of defence: a target created between plan and commit is not replaced
    (the commit links, which fails on an existing name), whatever the client's policy."""
    api = api_for(deny)
    root = deny.docroots["alice"]
    s = await upload_session(api, "alice", "late.bin", overwrite="always")
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    assert r.status == 200 and r.json["missing"] == {"0": [[0, 3]]}
    assert r.json.get("refused", {}) == {}
    data = b"n" * SIZE
    payload, digest = frames(data)
    assert (await api.call(s, "PUT", "/blocks", payload)).status == 200
    (root / "late.bin").write_bytes(b"someone else's file")
    r = await api.call(s, "POST", "/commit", {"files": [{"file": 0, "root": digest}]})
    assert (root / "late.bin").read_bytes() == b"someone else's file"
    assert r.status == 200 and r.json["results"]["0"] == {
        "error": "late.bin: exists and overwrite is not allowed", "status": 409}
    assert (await api.call(s, "DELETE", "", {})).status == 200


async def test_overwrite_deny_after_sighup_applies_to_open_sessions(
        tmp_path: Path, api_for: Any) -> None:
    """A session opened under ``allow`` plans under the ``deny`` a SIGHUP brought in."""
    d = start_daemon(tmp_path / "daemon", {"alice": (True, True)})
    try:
        api = api_for(d)
        victim = make_file(d.docroots["alice"] / "v.bin", SIZE, seed=1)
        old = sha256(victim)
        s = await upload_session(api, "alice", "v.bin")
        reload(d, {"alice": (True, True)}, "<overwrite>deny</overwrite>")
        r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
        assert r.status == 200 and r.json["missing"] == {}
        assert r.json["refused"] == {"0": "exists, and the server does not overwrite "
                                          "(file_system/overwrite=deny)"}
        payload, digest = frames(b"z" * SIZE)
        assert (await api.call(s, "PUT", "/blocks", payload)).status == 400  # no receiver for it
        r = await api.call(s, "POST", "/commit", {"files": [{"file": 0, "root": digest}]})
        assert r.json["results"]["0"]["error"] == "unknown file index 0"
        assert sha256(victim) == old
        assert sorted(p.name for p in d.docroots["alice"].iterdir()) == ["v.bin"]
    finally:
        d.stop(signal.SIGKILL)


async def test_many_hostile_calls_do_not_stall_other_clients(cd: Daemon, api_for: Any) -> None:
    """Malformed bodies fired concurrently cost each one a refusal; an info call in the
    middle is answered promptly (the event loop never ran unbounded work)."""
    mark = log_mark(cd)
    api = api_for(cd)
    s = await api.open("alice", {"direction": "download", "path": "/victim.bin"})
    bad = [api.call(s, "POST", "/want", {"blocks": [[0, 0, 10**12 + k]]}) for k in range(50)]
    bad += [api.call(s, "POST", "/want", DEEP) for _ in range(10)]
    t = time.monotonic()
    results = await asyncio.gather(*bad, api.request("GET", "/info"))
    assert time.monotonic() - t < 10
    assert [r.status for r in results[:-1]] == [400] * 60 and results[-1].status == 200
    assert (await api.call(s, "DELETE", "", {})).status == 200
    assert_log_clean(cd, mark)

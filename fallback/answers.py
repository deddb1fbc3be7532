"""What a daemon answers, checked before the client acts on it.

The client trusts nothing that comes off the wire: a hostile daemon, or anyone
on the path of a plain-HTTP transfer, could name files outside the destination
(``../.bashrc``, ``/etc/passwd``), send a manifest that is not a tree, or claim
sizes that make the client allocate without bound. ``download_answer`` checks
a download session's answer the way the daemon checks a client's upload
(``FileEntry.from_json``, ``check_tree``), and ``confine_download`` checks the
local paths it leads to against symlinks that already exist there. The other
answers (upload states, plan, commit, digests) are checked for their shapes and
bounded by what the client itself sent. Everything raises ``ProtocolError``.

The answers are frozen dataclasses defined here once for both ends: the
daemon (``fallback.server``, ``fallback.sessions``) builds them and sends
``to_json()``; the client reads them back through the checks of this module
(``from_json`` with the bounds it knows). The requests are ``fallback.control``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallback.control import MAX_ERROR_TEXT, MAX_ROOT_TEXT, Flow
from fallback.jsonbody import Items
from fallback.paths import confine
from transport.blocks.manifest import FileEntry, check_name, check_tree
from transport.blocks.plan import TargetState
from transport.blocks.ranges import RangeSet, parse_ranges
from transport.errors import ConflictError, ProtocolError

MAX_ENTRIES = 1_000_000
"""Most manifest entries (files and folders) a download may list; the answer's
size is bounded first (``fallback.remote.MAX_ANSWER``)."""

MAX_TOTAL_BLOCKS = 1 << 24
"""Most blocks a download may have in all (64 TiB at the 4 MiB default block
size): the client keeps a list of missing blocks per file while it runs."""

DEFAULT_NAME = "download"
"""Local name of a download whose daemon sends no name (a docroot of ``/``)."""


# -- the answers, one definition for both ends ------------------------------------------------------
# The daemon builds these and sends ``to_json()``; the client parses them with the checks
# below (``from_json`` with the bounds only the client knows: what it asked for).
@dataclass(frozen=True, slots=True)
class DownloadOpened:
    """A checked answer to ``POST /session`` for a download (docs/protocol.md)."""

    name: str  # one path component: the source's name, the local name under a folder
    entries: list[FileEntry]  # a tree: root first, parents before children
    skipped: list[str]  # "relpath: reason", files the daemon left out
    streams_max: int | None  # the daemon's cap on parallel streams, if it gave one
    id: str = ""
    token: str = ""
    flow: Flow | None = None  # the bandwidth that applies (the server's caps won)

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """``lazy``: the entries as ``jsonbody.Items`` (the daemon's answer, encoded a slice
        at a time: ``fallback.jsonbody``)."""
        entries: Any = Items(self.entries, FileEntry.to_json) if lazy \
            else [e.to_json() for e in self.entries]
        d: dict[str, Any] = {
            "id": self.id, "token": self.token, "name": self.name,
            "entries": entries, "skipped": list(self.skipped),
            "streams_max": self.streams_max}
        if self.flow is not None:
            d["flow"] = self.flow.to_json()
        return d


DownloadAnswer = DownloadOpened  # the name it had before the answers were shared


def download_answer(opened: dict[str, Any]) -> DownloadOpened:
    """Check a download session's answer; raises ``ProtocolError`` saying what is wrong."""
    raw = opened.get("entries")
    if not isinstance(raw, list):
        raise ProtocolError("refused the daemon's answer: no 'entries' list")
    if len(raw) > MAX_ENTRIES:
        raise ProtocolError(f"refused the daemon's manifest: {len(raw)} entries "
                            f"(at most {MAX_ENTRIES})")
    try:
        entries = [FileEntry.from_json(e) for e in raw]
        check_tree(entries)
        name = opened.get("name")
        name = DEFAULT_NAME if name is None or name == "" else check_name(name)
    except ProtocolError as exc:
        raise ProtocolError(f"refused the daemon's manifest: {exc.message}") from None
    blocks = sum(e.layout().count for e in entries if not e.is_dir)
    if blocks > MAX_TOTAL_BLOCKS:
        raise ProtocolError(f"refused the daemon's manifest: {blocks} blocks "
                            f"(at most {MAX_TOTAL_BLOCKS})")
    skipped = opened.get("skipped", [])
    if not isinstance(skipped, list) or len(skipped) > MAX_ENTRIES \
            or not all(isinstance(s, str) for s in skipped):
        raise ProtocolError("refused the daemon's answer: 'skipped' is not a list of strings")
    return DownloadOpened(name, entries, skipped, streams_cap(opened),
                          str(opened.get("id", "")), str(opened.get("token", "")),
                          answer_flow(opened))


def answer_flow(opened: dict[str, Any]) -> Flow | None:
    """An open answer's ``flow`` (what bandwidth applies), when the daemon gave one."""
    if opened.get("flow") is None:
        return None
    try:
        return Flow.from_json(opened["flow"])
    except ProtocolError as exc:
        raise ProtocolError(f"refused the daemon's answer: {exc.message}") from None


def streams_cap(opened: dict[str, Any]) -> int | None:
    """The daemon's ``streams_max`` (an int >= 1) or None when absent; ``ProtocolError``."""
    cap = opened.get("streams_max")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ProtocolError(f"refused the daemon's answer: bad streams_max {cap!r}")
    return cap


@dataclass(frozen=True, slots=True)
class UploadOpened:
    """The answer to ``POST /session`` for an upload: one ``TargetState`` per entry."""

    id: str
    token: str
    states: list[TargetState]
    root: str  # where the upload lands, relative to the docroot (for messages)
    streams_max: int | None
    policy: dict[str, Any] = field(default_factory=dict)  # rules the client applies itself
    flow: Flow | None = None  # the bandwidth that applies (the server's caps won)

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """``lazy``: as ``DownloadOpened.to_json``."""
        states: Any = Items(self.states, TargetState.to_json) if lazy \
            else [s.to_json() for s in self.states]
        d: dict[str, Any] = {
            "id": self.id, "token": self.token, "states": states,
            "root": self.root, "streams_max": self.streams_max, "policy": dict(self.policy)}
        if self.flow is not None:
            d["flow"] = self.flow.to_json()
        return d

    @classmethod
    def from_json(cls, opened: dict[str, Any], count: int) -> UploadOpened:
        """Checked: ``states`` has one entry per manifest entry we sent (``count``)."""
        root = opened.get("root", "")
        policy = opened.get("policy", {})
        return cls(str(opened.get("id", "")), str(opened.get("token", "")),
                   upload_states(opened, count), root if isinstance(root, str) else "",
                   streams_cap(opened), policy if isinstance(policy, dict) else {},
                   answer_flow(opened))


def upload_states(opened: dict[str, Any], count: int) -> list[TargetState]:
    """An upload answer's ``states``: one ``TargetState`` per manifest entry."""
    raw = opened.get("states")
    if not isinstance(raw, list) or len(raw) != count:
        raise ProtocolError(f"refused the daemon's answer: 'states' is not a list of {count}")
    return [TargetState.from_json(s) for s in raw]


@dataclass(frozen=True, slots=True)
class PlanAnswer:
    """``{missing: {file: [[start, stop], ...]}, refused: {file: reason}}``."""

    missing: dict[int, RangeSet]
    refused: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"missing": {str(i): m.to_list() for i, m in self.missing.items()},
                "refused": {str(i): why for i, why in self.refused.items()}}

    @classmethod
    def from_json(cls, planned: Any, counts: dict[int, int]) -> PlanAnswer:
        """Checked against what we planned to send (``counts``: file -> block count)."""
        return cls(planned_missing(planned, counts), planned_refused(planned, counts))


def planned_missing(planned: Any, counts: dict[int, int]) -> dict[int, RangeSet]:
    """The ``missing`` of a ``/plan`` answer: file -> block ranges, each file one we plan
    to send (``counts``: its block count) and each range inside that file. Kept as
    ranges (``RangeSet``): a hostile answer costs what its text costs, never more. Files
    missing the same one range share one set (100,000 one-block files: one set, not 30 MB
    of them; issue 11): the sets are to read, not to change."""
    raw = planned.get("missing") if isinstance(planned, dict) else None
    if not isinstance(raw, dict):
        raise ProtocolError("refused the daemon's plan: no 'missing' object")
    out: dict[int, RangeSet] = {}
    shared: dict[tuple[int, int], RangeSet] = {}
    for k, ranges in raw.items():
        i = _int(k, "file")
        if i not in counts:
            raise ProtocolError(f"refused the daemon's plan: file {k!r}")
        got = _ranges(ranges, counts[i], f"refused the daemon's plan: file {i}")
        out[i] = shared.setdefault(next(iter(got)), got) if len(got) == 1 else got
    return out


def planned_refused(planned: Any, counts: dict[int, int]) -> dict[int, str]:
    """The ``refused`` of a ``/plan`` answer (files the server's ``overwrite=deny`` kept):
    file -> reason, each file one we planned to send."""
    raw = planned.get("refused", {}) if isinstance(planned, dict) else None
    if not isinstance(raw, dict):
        raise ProtocolError("refused the daemon's plan: 'refused' is not an object")
    out: dict[int, str] = {}
    for k, why in raw.items():
        i = _int(k, "file")
        if i not in counts or not isinstance(why, str):
            raise ProtocolError(f"refused the daemon's plan: refused file {k!r}")
        out[i] = why[:500]
    return out


def _ranges(value: Any, count: int, what: str) -> RangeSet:
    """``[[start, stop], ...]`` inside ``[0, count)``; also the block numbers an older
    daemon sent in a commit's ``missing``."""
    if isinstance(value, list) and all(type(b) is int for b in value):
        value = [[b, b + 1] for b in value]
    return parse_ranges(value, limit=count, what=what, max_ranges=min(count, 1 << 22) or 1)


@dataclass(frozen=True, slots=True)
class Committed:
    """``{ok: true, root}``: the file is published; ``root`` is its whole-file digest."""

    root: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "root": self.root}


@dataclass(frozen=True, slots=True)
class CommitMissing:
    """``{missing: [[start, stop], ...]}``: blocks the receiver still lacks; send them."""

    missing: RangeSet

    def to_json(self) -> dict[str, Any]:
        return {"missing": self.missing.to_list()}


@dataclass(frozen=True, slots=True)
class CommitVerifying:
    """``{verifying: n}``: ``n`` carried-over blocks are still being re-read; ask again."""

    left: int

    def to_json(self) -> dict[str, Any]:
        return {"verifying": self.left}


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """``{error, status}``: the file cannot be committed (the status classifies why)."""

    error: str
    status: int = 500

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "status": self.status}


CommitResult = Committed | CommitMissing | CommitVerifying | CommitFailed


@dataclass(frozen=True, slots=True)
class CommitAnswer:
    """``{results: {file: CommitResult}}``."""

    results: dict[int, CommitResult]

    def to_json(self) -> dict[str, Any]:
        return {"results": {str(i): r.to_json() for i, r in self.results.items()}}

    @classmethod
    def from_json(cls, committed: Any, counts: dict[int, int]) -> CommitAnswer:
        """Checked: each file one we committed (``counts``), each range inside it."""
        return cls(commit_results(committed, counts))


def commit_results(committed: Any, counts: dict[int, int]) -> dict[int, CommitResult]:
    """The ``results`` of a ``/commit`` answer, each ``{ok, root: str}``, ``{missing:
    [[start, stop], ...]}`` inside the file, ``{verifying: n}`` or ``{error: str, status: int}``."""
    raw = committed.get("results") if isinstance(committed, dict) else None
    if not isinstance(raw, dict):
        raise ProtocolError("refused the daemon's commit answer: no 'results' object")
    out: dict[int, CommitResult] = {}
    for k, r in raw.items():
        i = _int(k, "file")
        if i not in counts or not isinstance(r, dict):
            raise ProtocolError(f"refused the daemon's commit answer: file {k!r}")
        res: CommitResult | None = None
        if "error" in r:
            status = r.get("status", 500)
            if isinstance(r["error"], str) and type(status) is int:
                res = CommitFailed(r["error"][:MAX_ERROR_TEXT], status)
        elif r.get("ok"):
            if isinstance(r.get("root"), str):
                res = Committed(r["root"][:MAX_ROOT_TEXT])
        elif "verifying" in r:  # carried-over blocks still being re-read: ask again
            n = r["verifying"]
            if type(n) is int and 0 <= n <= counts[i]:
                res = CommitVerifying(n)
        else:
            res = CommitMissing(_ranges(r.get("missing"), counts[i],
                                        f"refused the daemon's commit answer for file {i}"))
        if res is None:
            raise ProtocolError(f"refused the daemon's commit answer for file {i}: {r!r:.200}")
        out[i] = res
    return out


@dataclass(frozen=True, slots=True)
class DigestsAnswer:
    """``{digests: {block: hex}, root?}``: source block digests, and the whole-file digest."""

    digests: dict[int, bytes]
    root: str | None = None
    pending: bool = False
    """The root was asked for but not reached within the daemon's per-call read budget
    (``MAX_DIGEST_BYTES``): ask again; blocks left out of ``digests`` likewise."""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"digests": {str(b): v.hex() for b, v in self.digests.items()}}
        if self.root is not None:
            d["root"] = self.root
        if self.pending:
            d["pending"] = True
        return d

    @classmethod
    def from_json(cls, got: Any) -> DigestsAnswer:
        pending = got.get("pending", False) if isinstance(got, dict) else False
        if not isinstance(pending, bool):
            raise ProtocolError("refused the daemon's digests answer: bad 'pending'")
        return cls(*digests_answer(got), pending)


def digests_answer(got: Any) -> tuple[dict[int, bytes], str | None]:
    """A ``/digests`` answer: block -> 32-byte digest, and the whole-file ``root`` if given."""
    raw = got.get("digests", {}) if isinstance(got, dict) else None
    root = got.get("root") if isinstance(got, dict) else None
    if not isinstance(raw, dict) or not (root is None or isinstance(root, str)):
        raise ProtocolError("refused the daemon's digests answer")
    try:
        out = {int(b): bytes.fromhex(h) for b, h in raw.items()}
    except (TypeError, ValueError):
        raise ProtocolError("refused the daemon's digests answer: bad digest") from None
    return out, root


@dataclass(frozen=True, slots=True)
class RootsAnswer:
    """``{roots: {file: root}, errors: {file: message}}``: whole-file digests over the
    sources' current bytes; a file that changed is an error for that file only."""

    roots: dict[int, str]
    errors: dict[int, str] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    """Files not finished within the daemon's per-call read budget: ask again for them."""

    def to_json(self) -> dict[str, Any]:
        return {"roots": {str(i): r for i, r in self.roots.items()},
                "errors": {str(i): e for i, e in self.errors.items()},
                "pending": list(self.pending)}

    @classmethod
    def from_json(cls, got: Any, asked: Sequence[int]) -> RootsAnswer:
        """Checked: only files we asked for (``asked``), strings of bounded length."""
        wanted = set(asked)
        out: list[dict[int, str]] = []
        for key, limit in (("roots", MAX_ROOT_TEXT), ("errors", MAX_ERROR_TEXT)):
            raw = got.get(key, {}) if isinstance(got, dict) else None
            if not isinstance(raw, dict):
                raise ProtocolError(f"refused the daemon's digests answer: bad {key!r}")
            part: dict[int, str] = {}
            for k, v in raw.items():
                i = _int(k, "file")
                if i not in wanted or not isinstance(v, str):
                    raise ProtocolError(f"refused the daemon's digests answer: {key} {k!r:.50}")
                part[i] = v[:limit]
            out.append(part)
        raw_pending = got.get("pending", []) if isinstance(got, dict) else None
        if not isinstance(raw_pending, list) or len(raw_pending) > len(wanted):
            raise ProtocolError("refused the daemon's digests answer: bad 'pending'")
        pending = [_int(k, "file") for k in raw_pending]
        if any(i not in wanted for i in pending):
            raise ProtocolError("refused the daemon's digests answer: 'pending' names a file "
                                "not asked for")
        return cls(out[0], out[1], pending)


@dataclass(frozen=True, slots=True)
class WantAnswer:
    """``{queued: n}``: blocks named by a ``want`` (duplicates once)."""

    queued: int

    def to_json(self) -> dict[str, Any]:
        return {"queued": self.queued}

    @classmethod
    def from_json(cls, got: Any) -> WantAnswer:
        n = got.get("queued", 0) if isinstance(got, dict) else None
        if type(n) is not int or n < 0:
            raise ProtocolError("refused the daemon's want answer")
        return cls(n)


@dataclass(frozen=True, slots=True)
class KeepaliveAnswer:
    """``{idle_takeover, interval}`` (seconds): after ``idle_takeover`` seconds without
    hearing from the client on any path, the daemon may hand its targets to a new
    session; the client calls at least every ``interval`` seconds while quiet."""

    idle_takeover: float
    interval: float

    def to_json(self) -> dict[str, Any]:
        return {"idle_takeover": self.idle_takeover, "interval": self.interval}

    @classmethod
    def from_json(cls, got: Any) -> KeepaliveAnswer:
        vals: list[float] = []
        for k in ("idle_takeover", "interval"):
            v: Any = got.get(k) if isinstance(got, dict) else None
            if type(v) not in (int, float) or not 0 < v < 3600:
                raise ProtocolError("refused the daemon's keepalive answer")
            vals.append(float(v))
        return cls(vals[0], vals[1])


def _int(v: Any, what: str) -> int:
    """A JSON number, or a JSON object's key holding one (``"12"``)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 20:
        return int(v)
    raise ProtocolError(f"refused the daemon's answer: bad {what} number {v!r:.50}")


def confine_download(anchor: Path, targets: Sequence[Path]) -> None:
    """Refuse a download whose local paths leave ``anchor`` or collide.

    ``anchor`` is the destination the user named (the folder a download goes
    into, or the one its named root goes in); ``targets`` are the local paths
    of the manifest's entries in manifest order (parents first). A target
    leaves the destination when a symlink that already exists locally leads out
    of it (``dest/x -> /etc`` and an entry ``x/passwd``): ``PathError``. Two
    entries on one local path (a decrypted ``x.fallback-env`` beside ``x``):
    ``ConflictError``. Below a folder the download creates nothing can be a
    symlink, and below a checked folder one ``lstat`` per target tells, so a
    re-run over 100,000 existing files costs 100,000 ``lstat`` calls.
    """
    seen: set[Path] = set()
    fresh: set[Path] = set()  # targets that do not exist yet (the download creates them)
    real: dict[Path, Path] = {}  # checked targets that exist -> their real path
    if os.path.lexists(anchor):
        real[anchor] = Path(os.path.realpath(anchor))
    for t in targets:
        if t in seen:
            raise ConflictError(f"{t.name}: two entries of the download would be written there")
        seen.add(t)
        if t.parent in fresh or not real:
            fresh.add(t)
            continue
        parent = real.get(t.parent)
        if parent is not None:
            try:
                st = os.lstat(t)
            except FileNotFoundError:
                fresh.add(t)
                continue
            except OSError:
                st = None  # confine() below tells what is wrong
            if st is not None and not stat.S_ISLNK(st.st_mode):
                real[t] = parent / t.name
                continue
        confine(anchor, t, within="the destination")
        if os.path.lexists(t):
            real[t] = Path(os.path.realpath(t))
        else:
            fresh.add(t)


def plain_name(name: str, suffix: str) -> str:
    """``name`` without an envelope ``suffix`` for its decrypted copy, when what is
    left is still a proper name (``.fallback-env`` or ``..fallback-env`` keep it)."""
    stripped = name.removesuffix(suffix)
    try:
        return check_name(stripped)
    except ProtocolError:
        return name

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
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, slots=True)
class DownloadAnswer:
    """A checked answer to ``POST /session`` for a download (docs/protocol.md)."""

    name: str  # one path component: the source's name, the local name under a folder
    entries: list[FileEntry]  # a tree: root first, parents before children
    skipped: list[str]  # "relpath: reason", files the daemon left out
    streams_max: int | None  # the daemon's cap on parallel streams, if it gave one


def download_answer(opened: dict[str, Any]) -> DownloadAnswer:
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
    return DownloadAnswer(name, entries, skipped, streams_cap(opened))


def streams_cap(opened: dict[str, Any]) -> int | None:
    """The daemon's ``streams_max`` (an int >= 1) or None when absent; ``ProtocolError``."""
    cap = opened.get("streams_max")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ProtocolError(f"refused the daemon's answer: bad streams_max {cap!r}")
    return cap


def upload_states(opened: dict[str, Any], count: int) -> list[TargetState]:
    """An upload answer's ``states``: one ``TargetState`` per manifest entry."""
    raw = opened.get("states")
    if not isinstance(raw, list) or len(raw) != count:
        raise ProtocolError(f"refused the daemon's answer: 'states' is not a list of {count}")
    return [TargetState.from_json(s) for s in raw]


def planned_missing(planned: Any, counts: dict[int, int]) -> dict[int, RangeSet]:
    """The ``missing`` of a ``/plan`` answer: file -> block ranges, each file one we plan
    to send (``counts``: its block count) and each range inside that file. Kept as
    ranges (``RangeSet``): a hostile answer costs what its text costs, never more."""
    raw = planned.get("missing") if isinstance(planned, dict) else None
    if not isinstance(raw, dict):
        raise ProtocolError("refused the daemon's plan: no 'missing' object")
    out: dict[int, RangeSet] = {}
    for k, ranges in raw.items():
        i = _int(k, "file")
        if i not in counts:
            raise ProtocolError(f"refused the daemon's plan: file {k!r}")
        out[i] = _ranges(ranges, counts[i], f"refused the daemon's plan: file {i}")
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


def commit_results(committed: Any, counts: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The ``results`` of a ``/commit`` answer, each ``{ok, root: str}``, ``{missing:
    RangeSet}`` (parsed from ``[[start, stop], ...]`` inside the file), ``{verifying: n}``
    or ``{error: str, status: int}``."""
    raw = committed.get("results") if isinstance(committed, dict) else None
    if not isinstance(raw, dict):
        raise ProtocolError("refused the daemon's commit answer: no 'results' object")
    out: dict[int, dict[str, Any]] = {}
    for k, r in raw.items():
        i = _int(k, "file")
        if i not in counts or not isinstance(r, dict):
            raise ProtocolError(f"refused the daemon's commit answer: file {k!r}")
        if "error" in r:
            ok = isinstance(r["error"], str) and isinstance(r.get("status", 500), int)
        elif r.get("ok"):
            ok = isinstance(r.get("root"), str)
        elif "verifying" in r:  # carried-over blocks still being re-read: ask again
            ok = isinstance(r["verifying"], int) and 0 <= r["verifying"] <= counts[i]
        else:
            r = dict(r, missing=_ranges(r.get("missing"), counts[i],
                                        f"refused the daemon's commit answer for file {i}"))
            ok = True
        if not ok:
            raise ProtocolError(f"refused the daemon's commit answer for file {i}: {r!r:.200}")
        out[i] = r
    return out


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

"""What a daemon answers, checked before the client acts on it.

The client trusts nothing that comes off the wire: a hostile daemon, or anyone
on the path of a plain-HTTP transfer, could name files outside the destination
(``../.bashrc``, ``/etc/passwd``), send a manifest that is not a tree, or claim
sizes that make the client allocate without bound. ``download_answer`` checks
a download session's answer the way the daemon checks a client's upload
(``FileEntry.from_json``, ``check_tree``), and ``confine_download`` checks the
local paths it leads to against symlinks that already exist there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fallback.paths import confine
from transport.blocks.manifest import FileEntry, check_name, check_tree
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
    streams_max = opened.get("streams_max")
    if streams_max is not None and (not isinstance(streams_max, int)
                                    or isinstance(streams_max, bool) or streams_max < 1):
        raise ProtocolError(f"refused the daemon's answer: bad streams_max {streams_max!r}")
    return DownloadAnswer(name, entries, skipped, streams_max)


def confine_download(anchor: Path, targets: Sequence[Path]) -> None:
    """Refuse a download whose local paths leave ``anchor`` or collide.

    ``anchor`` is the destination the user named (the folder a download goes
    into, or the new root itself); ``targets`` are the local paths of the
    manifest's entries in manifest order (parents first). A target leaves the
    destination when a symlink that already exists locally leads out of it
    (``dest/x -> /etc`` and an entry ``x/passwd``): ``PathError``. Two entries
    on one local path (a decrypted ``x.fallback-env`` beside ``x``):
    ``ConflictError``. Only targets whose folder already exists are resolved;
    below a folder the download creates, nothing can be a symlink.
    """
    seen: set[Path] = set()
    fresh: set[Path] = set()  # targets that do not exist yet (the download creates them)
    exists = os.path.lexists(anchor)  # if not, the download creates all of it
    for t in targets:
        if t in seen:
            raise ConflictError(f"{t.name}: two entries of the download would be written there")
        seen.add(t)
        if not exists or t.parent in fresh:
            fresh.add(t)
            continue
        confine(anchor, t, within="the destination")
        if not os.path.lexists(t):
            fresh.add(t)


def plain_name(name: str, suffix: str) -> str:
    """``name`` without an envelope ``suffix`` for its decrypted copy, when what is
    left is still a proper name (``.fallback-env`` or ``..fallback-env`` keep it)."""
    stripped = name.removesuffix(suffix)
    try:
        return check_name(stripped)
    except ProtocolError:
        return name

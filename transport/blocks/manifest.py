"""What a session moves: the list of files and folders, as both ends see it.

A manifest entry is plain data that crosses the control channel as JSON; the
receiver never trusts it, so ``FileEntry.from_json`` validates every field
(relative paths only, no ``..``, sane sizes) and raises ``ProtocolError``, and
``check_tree`` checks that a list of entries describes one tree.

Names: every name a POSIX file system allows is carried (backslashes, newlines,
leading or trailing spaces, any byte but ``/`` and NUL). A name that is not
valid UTF-8 travels as Python's file system decoding gives it (PEP 383
``surrogateescape``: each undecodable byte 0x80-0xFF becomes the lone surrogate
U+DC80+byte, written ``\\udcXX`` in the JSON), so both ends write the same bytes;
a path is accepted only in that canonical form (``check_relpath``).
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transport.blocks.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, BlockLayout
from transport.errors import ProtocolError

MAX_PATH_BYTES = 4096
"""Longest relative path, in bytes: Linux's PATH_MAX."""

MAX_FILE_BLOCKS = 1 << 24
"""Most blocks one file may have (64 TiB at the 4 MiB default block size, 1 PiB at
the 64 MiB maximum): both ends keep per-block state (the missing list, the
journal's digests), so a peer must not be able to claim a file of 2**62 bytes."""

MTIME_RANGE = (-(1 << 63), (1 << 63) - 1)
"""mtime_ns must fit a signed 64-bit integer (``os.utime`` raises OverflowError beyond)."""


def check_relpath(path: object) -> str:
    """Validate a manifest path: relative, '/'-separated, no '..', no NUL; returns it.

    ``""`` stands for the transfer root itself (a single-file transfer). Any
    other character is allowed, backslashes included (a plain name on POSIX).
    Lone surrogates must be ``surrogateescape`` bytes (U+DC80-U+DCFF) that do
    not together spell valid UTF-8, so one path names exactly one byte string.
    Raises ``ProtocolError`` naming the offending path.
    """
    if not isinstance(path, str):
        raise ProtocolError("path must be a string")
    if path == "":
        return path
    if "\x00" in path:
        raise ProtocolError(f"NUL character in path {path!r}")
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ProtocolError(f"invalid character in path {path!r} (a lone surrogate)") from None
    if raw.decode("utf-8", "surrogateescape") != path:
        raise ProtocolError(f"path {path!r} is not in canonical form (escaped bytes that are UTF-8)")
    if len(raw) > MAX_PATH_BYTES:
        raise ProtocolError(f"path too long ({len(raw)} bytes, at most {MAX_PATH_BYTES})")
    if path.startswith("/"):
        raise ProtocolError(f"absolute path refused: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ProtocolError(f"path component {part!r} refused in {path!r}")
    return path


def check_name(name: object) -> str:
    """Validate a single path component (a transfer's name): a non-empty ``check_relpath``
    path without '/'. Returns it; raises ``ProtocolError``."""
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"name must be a non-empty string, not {name!r}")
    check_relpath(name)
    if "/" in name:
        raise ProtocolError(f"name {name!r} must be a single path component")
    return name


def check_tree(entries: Sequence[FileEntry]) -> None:
    """Check that ``entries`` describe one tree, as ``walk_source`` produces them.

    The first entry is the root (path ``""``); a file root stands alone; every
    other path is unique and its parent folder is listed before it (so no file
    is the parent of another entry). Raises ``ProtocolError``.
    """
    if not entries:
        raise ProtocolError("the manifest is empty")
    if entries[0].path != "":
        raise ProtocolError("the first manifest entry must be the transfer root")
    if not entries[0].is_dir and len(entries) > 1:
        raise ProtocolError("a file transfer has exactly one manifest entry")
    dirs = {""}
    seen = {""}
    for e in entries[1:]:
        if e.path in seen:
            raise ProtocolError(f"manifest lists {e.path or '(root)'!r} twice")
        parent = e.path.rpartition("/")[0]
        if parent not in dirs:
            raise ProtocolError(f"manifest lists {e.path!r} before its folder {parent!r}"
                                if parent not in seen else
                                f"manifest puts {e.path!r} inside a file")
        seen.add(e.path)
        if e.is_dir:
            dirs.add(e.path)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file or folder of a transfer, relative to the transfer root.

    ``header`` is the stored form's header (an encryption envelope's, #6), so
    the receiver can lay out and resume the stored object without the key.
    """

    path: str
    kind: str  # "file" | "dir"
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    block_size: int = 0
    header: bytes = b""
    overhead: int = 0
    transform: str = "identity"

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def identity(self) -> list[object]:
        """What must be unchanged for a partial file to be resumed (``attrs``)."""
        return [self.size, self.mtime_ns, self.block_size, self.transform, self.header.hex()]

    def stored_size(self) -> int:
        return self.layout().stored_size if self.kind == "file" else 0

    def layout(self) -> BlockLayout:
        """Geometry of the stored form (what the wire carries)."""
        return BlockLayout(self.size, self.block_size, len(self.header), self.overhead)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind}
        if self.kind == "file":
            d.update(
                size=self.size, mtime_ns=self.mtime_ns, mode=self.mode, block_size=self.block_size
            )
            if self.transform != "identity":
                d.update(transform=self.transform, header=self.header.hex(), overhead=self.overhead)
        else:
            d.update(mtime_ns=self.mtime_ns, mode=self.mode)
        return d

    @classmethod
    def from_json(cls, d: object) -> FileEntry:
        if not isinstance(d, dict):
            raise ProtocolError("manifest entry must be an object")
        try:
            kind = d["kind"]
            if kind not in ("file", "dir"):
                raise ProtocolError(f"unknown entry kind {kind!r}")
            size = int(d.get("size", 0))
            mtime_ns = int(d.get("mtime_ns", 0))
            mode = stat.S_IMODE(int(d.get("mode", 0o755 if kind == "dir" else 0o644)))
            header = bytes.fromhex(str(d.get("header", "")))
            overhead = int(d.get("overhead", 0))
            block_size = int(d.get("block_size", 0))
            transform = str(d.get("transform", "identity"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad manifest entry: {exc}") from None
        if kind == "file" and not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ProtocolError(f"bad manifest entry: block size {block_size}")
        if size < 0 or overhead < 0 or overhead > 4096 or len(header) > 65536:
            raise ProtocolError("bad manifest entry: size out of range")
        if kind == "file" and -(-size // block_size) > MAX_FILE_BLOCKS:
            raise ProtocolError(f"bad manifest entry: {size} bytes is more than {MAX_FILE_BLOCKS} "
                                f"blocks of {block_size} bytes")
        if not MTIME_RANGE[0] <= mtime_ns <= MTIME_RANGE[1]:
            raise ProtocolError(f"bad manifest entry: mtime_ns {mtime_ns} out of range")
        return cls(
            path=check_relpath(d.get("path", "")),
            kind=kind,
            size=size,
            mtime_ns=mtime_ns,
            mode=mode,
            block_size=block_size,
            header=header,
            overhead=overhead,
            transform=transform,
        )

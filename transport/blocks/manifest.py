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

Bounds, chosen so no real transfer meets them while a hostile peer cannot make
a receiver allocate or loop without bound (every block count is derived from
them, and block sets are kept as ranges, never expanded):

* ``MAX_FILE_SIZE`` = 2**50 bytes (1 PiB) per file;
* ``MAX_PATH_BYTES`` = 4096 bytes per path (Linux ``PATH_MAX``), ``MAX_NAME_BYTES``
  = 255 bytes per component (``NAME_MAX``);
* ``MAX_ENTRIES`` = 2**22 (4,194,304) files and folders per manifest;
* ``mtime_ns`` within a signed 64-bit count of nanoseconds (what ``utimensat`` takes),
  ``mode`` within ``0o7777`` (permission bits only);
* block size within ``layout.MIN_BLOCK_SIZE`` .. ``layout.MAX_BLOCK_SIZE``; an
  envelope header up to 64 KiB, a per-block overhead up to 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transport.blocks.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, BlockLayout
from transport.errors import ProtocolError

MAX_PATH_BYTES = 4096
"""Longest relative path, in bytes: Linux's PATH_MAX."""

MTIME_RANGE = (-(1 << 63), (1 << 63) - 1)
"""mtime_ns must fit a signed 64-bit integer (``os.utime`` raises OverflowError beyond)."""

MAX_NAME_BYTES = 255
MAX_FILE_SIZE = 1 << 50
MAX_ENTRIES = 1 << 22
MAX_HEADER_BYTES = 65536
MAX_OVERHEAD = 4096
TRANSFORMS = ("identity", "envelope-v1")
"""Stored forms a receiver knows (``transform.Identity``, ``envelope.EnvelopeTransform``)."""
_INT64 = 1 << 63


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
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ProtocolError(f"path component longer than {MAX_NAME_BYTES} bytes in {path[:80]!r}")
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
        """Parse and bound one wire entry; raises ``ProtocolError`` naming the bad field.

        Numbers must be JSON integers (not floats, strings or booleans) within
        the module's bounds; unknown keys are ignored (a newer peer may add some).
        """
        if not isinstance(d, dict):
            raise ProtocolError("manifest entry must be an object")
        if "path" not in d or "kind" not in d:
            raise ProtocolError("manifest entry needs 'path' and 'kind'")
        path = check_relpath(d["path"])
        where = f"manifest entry {path[:80] or '(root)'!r}"
        kind = d["kind"]
        if kind not in ("file", "dir"):
            raise ProtocolError(f"{where}: unknown kind {_shown(kind)}")
        is_file = kind == "file"
        size = _int(d, "size", 0, 0, MAX_FILE_SIZE if is_file else 0, where)
        mtime_ns = _int(d, "mtime_ns", 0, -_INT64, _INT64 - 1, where)
        mode = _int(d, "mode", 0o644 if is_file else 0o755, 0, 0o7777, where)
        block_size = _int(d, "block_size", 0, MIN_BLOCK_SIZE if is_file else 0,
                          MAX_BLOCK_SIZE if is_file else 0, where)
        overhead = _int(d, "overhead", 0, 0, MAX_OVERHEAD, where)
        transform = d.get("transform", "identity")
        if transform not in TRANSFORMS:
            raise ProtocolError(f"{where}: unknown transform {_shown(transform)}")
        header_hex = d.get("header", "")
        if not isinstance(header_hex, str) or len(header_hex) > 2 * MAX_HEADER_BYTES:
            raise ProtocolError(f"{where}: header must be a hex string of at most "
                                f"{MAX_HEADER_BYTES} bytes")
        try:
            header = bytes.fromhex(header_hex)
        except ValueError:
            raise ProtocolError(f"{where}: header is not hex") from None
        if transform == "identity" and (header or overhead):
            raise ProtocolError(f"{where}: a plain file has no header or overhead")
        return cls(
            path=path,
            kind=kind,
            size=size,
            mtime_ns=mtime_ns,
            mode=mode,
            block_size=block_size,
            header=header,
            overhead=overhead,
            transform=transform,
        )


def _shown(value: object) -> str:
    """A value for a message: short strings quoted, anything else by its type only
    (a nested list's ``str`` could be huge, or recurse too deeply)."""
    return repr(value[:40]) if isinstance(value, str) else f"of type {type(value).__name__}"


def _int(d: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    """``d[key]`` as a JSON integer within ``[lo, hi]`` (``default`` when absent)."""
    value = d.get(key, default)
    if type(value) is not int:  # bool is an int subclass, and 1.0 or "1" are not integers
        raise ProtocolError(f"{where}: {key} must be an integer")
    if not lo <= value <= hi:
        raise ProtocolError(f"{where}: {key} {value if value.bit_length() <= 64 else '(huge)'} "
                            f"outside [{lo}, {hi}]")
    return value


def entries_from_json(value: object) -> list[FileEntry]:
    """A whole manifest: at most ``MAX_ENTRIES`` entries, the root (``""``) first,
    paths unique, every other entry inside a folder listed before it (the order
    ``tree.walk_source`` produces). Raises ``ProtocolError``."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("entries must be a non-empty list")
    if len(value) > MAX_ENTRIES:
        raise ProtocolError(f"manifest has {len(value)} entries, more than {MAX_ENTRIES}")
    entries = [FileEntry.from_json(e) for e in value]
    check_tree(entries)
    return entries


def rebasable_identity(old: list[object], new: list[object]) -> bool:
    """A partial started from source identity ``old`` may keep the blocks that still
    match a source of identity ``new`` (a resume in mode ``full`` compares every one of
    them): the same size, block size and stored form, the mtime free. Stored as it
    is (``identity``) only: an envelope's blocks re-encrypted under the same header and
    nonces with other plaintext would reuse AES-GCM nonces, so an encrypted partial of a
    changed source starts over."""
    return (len(old) == len(new) == 5 and old[0] == new[0] and old[2:] == new[2:]
            and new[3] == "identity" and new[4] == "")

"""What a session moves: the list of files and folders, as both ends see it.

A manifest entry is plain data that crosses the control channel as JSON; the
receiver never trusts it, so ``FileEntry.from_json`` validates every field
(relative paths only, no ``..``, sane sizes) and raises ``ProtocolError``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from transport.blocks.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, BlockLayout
from transport.errors import ProtocolError

MAX_PATH_BYTES = 4096


def check_relpath(path: str) -> str:
    """Validate a manifest path: relative, '/'-separated, no '..', no NUL.

    ``""`` stands for the transfer root itself (a single-file transfer).
    """
    if not isinstance(path, str):
        raise ProtocolError("path must be a string")
    if path == "":
        return path
    if "\x00" in path or "\\" in path:
        raise ProtocolError(f"invalid character in path {path!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if path.startswith("/"):
        raise ProtocolError(f"absolute path refused: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ProtocolError(f"path component {part!r} refused in {path!r}")
    return path


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

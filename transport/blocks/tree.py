"""Turning a local file or folder into manifest entries, and back into targets.

Folders are walked without following symlinks into other trees: a symlink is
carried as the file or folder it points to only when that stays inside
``within`` (the docroot on a daemon); others are skipped and reported, so a
download cannot be made to read outside a docroot.

Fallback's own state folders (``transport.blocks.statedir``) never travel: a
folder named ``.fallback`` that holds our marker is skipped silently wherever
it is (a local folder that was a download destination has one at its top),
and so is the ``.fallback`` at the top of ``within`` (a daemon's docroot, whose
top reserves the name), marker or not. A user's own ``.fallback`` folder
elsewhere is an ordinary folder. A walk that starts inside a state folder of
ours is refused.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from transport.blocks.manifest import FileEntry, check_relpath
from transport.blocks.source import entry_for
from transport.blocks.statedir import STATE_DIR, in_state_dir, is_state_dir
from transport.errors import ErrorKind, PathError, TransportError, from_os_error


@dataclass(slots=True)
class SourceTree:
    """Entries in a stable order (parents before children) and their local paths."""

    root: Path = field(default_factory=Path)
    entries: list[FileEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, entry: FileEntry) -> None:
        self.entries.append(entry)

    @property
    def paths(self) -> TreePaths:
        """The local path of each entry, made when asked for (``TreePaths``)."""
        return TreePaths(self)


class TreePaths(Sequence[Path]):
    """``root / entry.path`` for each entry of a tree (``root`` for ``""``): a walk finds
    each entry at that path, so none is kept (a ``Path`` per file was ~600 bytes with
    its parts and string, 60 MB at 100,000 files: issue 11)."""

    __slots__ = ("_tree",)

    def __init__(self, tree: SourceTree) -> None:
        self._tree = tree

    def __len__(self) -> int:
        return len(self._tree.entries)

    @overload
    def __getitem__(self, k: int) -> Path: ...

    @overload
    def __getitem__(self, k: slice) -> list[Path]: ...

    def __getitem__(self, k: int | slice) -> Path | list[Path]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        rel = self._tree.entries[k].path
        return self._tree.root / rel if rel else self._tree.root


def _inside(real: str, within: str | None) -> bool:
    return within is None or real == within or real.startswith(within.rstrip("/") + "/")


def _ours(folder: Path, name: str, limit: str | None) -> bool:
    """``folder/name`` (named ``.fallback``) is a state folder of ours (it has the marker),
    or the one at the top of ``limit`` (marker or not)."""
    return is_state_dir(folder / name) or limit is not None and os.path.realpath(folder) == limit


def _in_top_state(real: str, limit: str | None) -> bool:
    """A real path leads into the state folder at the top of ``limit``."""
    return limit is not None and _inside(real, os.path.join(limit, STATE_DIR))


def walk_source(root: Path, block_size: int, *, within: Path | None = None,
                links: str = "follow", links_within: Path | None = None) -> SourceTree:
    """Entries for ``root`` (a file: one entry ``""``; a folder: itself and everything below).

    Names that cannot be carried (``SKIPPABLE_ERRNOS``, symlinks leading outside
    ``within``, special files) are listed in ``skipped``. Raises ``PathError`` for a
    missing or refused root, and for any other OS error the kind ``from_os_error``
    gives (``ResourceExhausted`` for EMFILE/ENFILE, 500 for EIO ...): a walk the system
    could not finish is an error, never a shorter list.

    Symlinks below ``root`` (``root`` itself is always followed): ``links="skip"`` skips
    every one; otherwise a link to a file is carried as that file when its target lies
    inside ``links_within`` (None: anywhere) and ``within``. Links to folders are never
    followed, dangling ones cannot be; each link not carried is listed in ``skipped``.
    """
    limit = os.path.realpath(within) if within is not None else None
    link_limit = os.path.realpath(links_within) if links_within is not None else None
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise PathError(f"{root.name or root}: no such file or folder", kind=ErrorKind.NOT_FOUND) from None
    tree = SourceTree(root)
    if not _inside(os.path.realpath(root), limit):
        raise PathError(f"{root.name}: refused, it leads outside the docroot")
    if in_state_dir(root) or _in_top_state(os.path.realpath(root), limit):
        raise PathError(f"{root.name or root}: fallback's own state folder, not a source")
    if not stat.S_ISDIR(st.st_mode):
        if not stat.S_ISREG(st.st_mode):
            raise PathError(f"{root.name}: not a regular file", kind=ErrorKind.BAD_REQUEST)
        tree.add(entry_for(root, "", block_size, st))
        return tree
    tree.add(entry_for(root, "", block_size, st))
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            _skip_or_raise(tree, rel or ".", exc)
            continue
        subdirs = []
        for name in names:
            path = folder / name
            relname = f"{rel}/{name}" if rel else name
            if name == STATE_DIR and _ours(folder, name, limit):
                continue  # not user data: neither sent nor reported
            try:
                check_relpath(relname)
                lst = os.lstat(path)
                is_link = stat.S_ISLNK(lst.st_mode)
                if is_link:
                    real = os.path.realpath(path)
                    if not _inside(real, limit):
                        tree.skipped.append(f"{relname}: symlink leads outside")
                        continue
                    if _in_top_state(real, limit):
                        continue
                    if links == "skip":
                        tree.skipped.append(f"{relname}: symlink skipped (--symbolic-links skip)")
                        continue
                    if not os.path.exists(path):  # dangling (ENOENT) or a loop (ELOOP)
                        tree.skipped.append(f"{relname}: dangling symlink (its target is missing)"
                                            if not os.path.lexists(real) else
                                            f"{relname}: symlink loop")
                        continue
                    if not _inside(real, link_limit):
                        tree.skipped.append(f"{relname}: symlink leads outside the source folder "
                                            "(--symbolic-links follow-all carries it)")
                        continue
                    lst = os.stat(path)
            except TransportError as exc:  # a name this protocol cannot carry: skip that one
                tree.skipped.append(f"{relname}: {exc.message}")
                continue
            except OSError as exc:  # resource errors fail the walk; see _skip_or_raise
                _skip_or_raise(tree, relname, exc)
                continue
            if stat.S_ISDIR(lst.st_mode):
                if is_link:
                    tree.skipped.append(f"{relname}: symlinked folder not followed")
                    continue
                tree.add(entry_for(path, relname, block_size, lst))
                subdirs.append((path, relname))
            elif stat.S_ISREG(lst.st_mode):
                tree.add(entry_for(path, relname, block_size, lst))
            else:
                tree.skipped.append(f"{relname}: not a regular file")
        stack.extend(reversed(subdirs))
    return tree


SKIPPABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                              errno.ELOOP, errno.ENAMETOOLONG})
"""Errors that say "this one name cannot be carried" (no permission, removed meanwhile, a
broken or looping symlink): the entry is skipped and reported. Any other error (out of
descriptors, I/O error) is the system's, not the name's, and fails the whole walk."""


def _skip_or_raise(tree: SourceTree, relname: str, exc: OSError) -> None:
    if exc.errno not in SKIPPABLE_ERRNOS:
        raise from_os_error(exc, relname) from None
    tree.skipped.append(f"{relname}: {exc.strerror or exc}")


def target_for(root: Path, relpath: str) -> Path:
    """The local path of a manifest entry under a transfer's target root."""
    return root.joinpath(*relpath.split("/")) if relpath else root


def describe_envelopes(tree: SourceTree) -> None:
    """Mark stored encryption envelopes (#6) so a receiver can decrypt or keep them.

    A file whose first bytes are a valid envelope header is described by its
    plaintext size and the header; its stored bytes are sent as they are. A
    file that merely starts with the magic but whose header does not parse,
    or whose length does not match the header, is sent as a plain file.
    """
    from transport.blocks import envelope as env

    for k, (entry, path) in enumerate(zip(tree.entries, tree.paths, strict=True)):
        if entry.is_dir or entry.size < env.HEADER_SIZE:
            continue
        try:
            with open(path, "rb") as f:
                prefix = f.read(env.MAX_HEADER_SIZE)  # v1 80 bytes, v2 96
            if not env.is_envelope(prefix):
                continue
            header = env.EnvelopeHeader.decode(prefix)
            prefix = prefix[: header.size]
        except OSError as exc:
            if exc.errno not in SKIPPABLE_ERRNOS:
                raise from_os_error(exc, entry.path or path.name) from None
            continue
        except (TransportError, ValueError):
            continue
        layout = header.layout
        if layout.stored_size != entry.size:
            continue
        tree.entries[k] = FileEntry(
            entry.path, "file", size=header.plain_size, mtime_ns=entry.mtime_ns, mode=entry.mode,
            block_size=header.block_size, header=prefix, overhead=layout.overhead,
            transform="envelope-v1",
        )

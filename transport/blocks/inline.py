"""Whole one-block files, received and committed in groups: no receiver, no journal.

A file of at most one block (``is_inline``) is a unit: its one block either
arrived whole and matched its digest, or it did not. Such files travel many
per bundle frame (``transport.http.framing``) and the receiver commits each
bundle as one **group** in one executor job (``commit_group``):

1. every item's digest is checked (a mismatch leaves that file missing, to be
   sent again; the others go on);
2. each file is written to its partial in the state folder (``StateDir``) with
   its mode and mtime set on the open descriptor (``fchmod``, ``futimens``);
3. with fsync on, **one** ``syncfs(2)`` for the whole group (per-file
   ``fdatasync`` where ``syncfs`` is missing); with fsync off, no sync at all;
4. one ``rename`` per file (``StateDir.publish``: a link where replacing is
   not allowed), then with fsync on one ``fsync`` per distinct parent folder.

While a group is written and published it holds a shared ``flock`` on the
state folder's ``parts/`` directory (one call per group): the retention sweep
(``transport.blocks.retention``) removes a partial without a journal only while
it holds that lock exclusively, so a live group's partials (whose mtimes are
already the sources', often old) are never taken from under it, and those a
killed group left are removed like any abandoned partial.

There is no journal because there is nothing to resume inside a one-block
file: after a kill, a file of the group is published whole under its real name
(the next run skips it as unchanged) or not at all (its partial is overwritten
by the next run, which sends that file again). What a kill costs is at most
the group in flight: ``BUNDLE_ITEMS`` files. The whole-file digest of a
one-block file is the digest of its block (``file_digest`` over one record),
which was just checked against the sender's, so the group's roots equal the
sender's by construction.

A file that cannot be published (a folder in the way, overwrite refused) is
reported in ``GroupResult.errors``, by file; nothing else of the group is lost.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import file_mode
from transport.blocks.statedir import StateDir
from transport.blocks.transform import BlockTransform
from transport.errors import ConflictError, IntegrityError, TransportError

Buffer = bytes | bytearray | memoryview


def is_inline(entry: FileEntry) -> bool:
    """Whether ``entry`` is a file of exactly one block (sent whole, in bundles)."""
    return not entry.is_dir and entry.layout().count == 1


@dataclass(frozen=True, slots=True)
class InlineTarget:
    """Where a one-block file goes: ``target`` (its real name), its manifest ``entry``, and
    ``decode`` when the receiver decrypts what arrives (a ``--decrypt`` download)."""

    target: Path
    entry: FileEntry
    decode: BlockTransform | None = None


@dataclass(frozen=True, slots=True)
class InlineDone:
    """A published one-block file: its wire ``root`` (``algo:hex``), the ``plain_root`` of
    the decoded file when it was decoded, and the wire bytes it carried."""

    file: int
    root: str
    plain_root: str | None
    nbytes: int


@dataclass(slots=True)
class GroupResult:
    """What ``commit_group`` did: files ``done``, files whose digest ``failed`` (send
    again) and files that could not be published (``errors``: file -> error)."""

    done: list[InlineDone] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[int, TransportError] = field(default_factory=dict)


def _manifest_name(target: Path, rel: str) -> str:
    return rel or target.name


def commit_group(items: Sequence[tuple[int, InlineTarget, Buffer, bytes]], state: StateDir, *,
                 fsync: bool, replace: bool,
                 name_of: Callable[[Path, str], str] | None = None) -> GroupResult:
    """Verify, write and publish ``(file, target, stored bytes, digest)`` items as one group
    (see the module docstring). Runs in a worker thread; raises only ``OSError`` from the
    state folder itself (per-file failures are in the result). Paths are handled as
    strings and partials opened relative to the state folder's descriptor: at 10,000
    files, ``pathlib`` alone cost more than the file system."""
    named = name_of or _manifest_name  # how an error names a file (``BlockSink``'s name_of)
    out = GroupResult()
    written: list[tuple[int, InlineTarget, str, InlineDone]] = []
    state.ensure()
    sync_each = fsync and _SYNCFS is None
    root = os.fsencode(state.root) + b"/"
    parts = os.fspath(state.parts)
    parts_fd = os.open(parts, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(parts_fd, fcntl.LOCK_SH)  # the sweep leaves lone partials alone meanwhile
        _write_group(items, state, root, parts, parts_fd, sync_each, out, written, named)
        if fsync and written and _SYNCFS is not None:
            _syncfs(parts_fd)
        _publish_group(state, written, fsync=fsync, replace=replace, out=out, named=named)
    finally:
        os.close(parts_fd)  # drops the lock
    return out


def _write_group(items: Sequence[tuple[int, InlineTarget, Buffer, bytes]], state: StateDir,
                 root: bytes, parts: str, parts_fd: int, sync_each: bool, out: GroupResult,
                 written: list[tuple[int, InlineTarget, str, InlineDone]],
                 named: Callable[[Path, str], str]) -> None:
    """Verify and write each item to its partial (``commit_group`` steps 1 and 2)."""
    for file, t, data, digest in items:
        entry = t.entry
        layout = entry.layout()
        offset, length = layout.stored_range(0)
        if len(data) != length or block_digest(data) != digest:
            out.failed.append(file)
            continue
        plain: str | None = None
        try:
            if t.decode is not None:
                body: Buffer = t.decode.decode(0, data)
                plain = file_digest(entry.block_size, entry.size, [block_digest(body)])
                chunks: list[tuple[int, Buffer]] = [(0, body)]
            else:
                chunks = [(offset, data)]
                if entry.header:
                    chunks.insert(0, (0, entry.header))
        except IntegrityError as exc:
            out.errors[file] = IntegrityError(f"{entry.path or t.target.name}: {exc.message}")
            continue
        name = _partial_name(root, t.target, state)
        try:
            fd = _create(name, parts_fd, entry.mode)
            try:
                for off, buf in chunks:
                    _pwrite_all(fd, buf, off)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                if sync_each:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            out.errors[file] = ConflictError(f"{named(t.target, entry.path)}: "
                                             f"{exc.strerror or exc}")
            continue
        root_digest = file_digest(entry.block_size, entry.size, [bytes(digest)])
        written.append((file, t, os.path.join(parts, name),
                        InlineDone(file, root_digest, plain, len(data))))


def _publish_group(state: StateDir, written: list[tuple[int, InlineTarget, str, InlineDone]], *,
                   fsync: bool, replace: bool, out: GroupResult,
                   named: Callable[[Path, str], str] = _manifest_name) -> None:
    """Rename each written partial to its target, then sync their folders (step 4)."""
    parents: set[str] = set()
    for file, t, partial, done in written:
        target = os.fspath(t.target)
        try:
            _publish(state, partial, target, replace)
        except TransportError as exc:
            out.errors[file] = exc
            _unlink(partial)
            continue
        except OSError as exc:
            out.errors[file] = ConflictError(f"{named(t.target, t.entry.path)}: "
                                             f"{exc.strerror or exc}")
            _unlink(partial)
            continue
        parents.add(os.path.dirname(target))
        out.done.append(done)
    if fsync:
        for p in parents:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _create(name: str, parts_fd: int, mode: int) -> int:
    """A new partial ``name`` in the state folder with the received file's mode
    (``file_mode``: no set-id bits, the umask applied): given to ``open`` itself, whose
    umask leaves those bits as they are, so a new partial costs no ``fchmod``. A partial
    a killed group left behind is truncated and given the mode explicitly."""
    want = file_mode(mode)
    try:
        return os.open(name, _CREATE, want, dir_fd=parts_fd)
    except FileExistsError:
        pass
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=parts_fd)
    try:
        os.fchmod(fd, want)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _partial_name(root: bytes, target: Path, state: StateDir) -> str:
    """``StateDir.partial``'s file name for ``target``, without ``pathlib``."""
    raw = os.fsencode(target)
    if not raw.startswith(root):
        return state.partial(target).name  # raises the PathError that explains it
    return hashlib.blake2b(raw[len(root):], digest_size=16).hexdigest() + ".partial"


def _publish(state: StateDir, partial: str, target: str, replace: bool) -> None:
    """Move ``partial`` to ``target`` (``StateDir.publish``: ``rename``, or ``link`` where
    replacing is not allowed; a copy across file systems). A folder in the way is a
    ``ConflictError``."""
    try:
        if replace:
            os.replace(partial, target)
        else:
            try:
                os.link(partial, target)
            except FileExistsError:
                raise ConflictError(f"{os.path.basename(target)}: exists and overwrite is "
                                    "not allowed") from None
            os.unlink(partial)
        return
    except IsADirectoryError:
        raise ConflictError(f"{os.path.basename(target)}: a folder of that name exists") from None
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    state.publish(Path(partial), Path(target), replace=replace)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _load_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """``syncfs(2)`` from the C library (Linux), or None where it is missing."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def _syncfs(fd: int) -> None:
    """Write back every dirty page of the file system holding ``fd`` (one call for a group)."""
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

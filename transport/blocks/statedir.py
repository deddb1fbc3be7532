"""Where a receiver keeps its own files: one state folder per root, outside the user's names.

A file being received needs two files of ours: the partial file (the bytes so far) and its
journal (the verified blocks, and the writer's lock). They used to sit beside the target as
``.NAME.fallback-partial`` and ``.NAME.fallback-journal``, in the user's own folder, where
they were listed and served as user files and where a user file of the same name was
mistaken for ours (a download then published a stale partial under the real name).

Any naming scheme inside the user's folders has that flaw: every name is a legal user name.
So, as a database keeps its files in its own directory, the receiver keeps them in a
**state folder** at the top of the tree it writes into, and names them by a hash of the
target's path, never by the user's name:

``ROOT/.fallback/``
    ``README`` (the marker: first line ``fallback state folder v1``, then what the folder is)
    ``parts/<h>.partial`` and ``parts/<h>.journal``, where ``<h>`` is the hex BLAKE2b-128
    (RFC 7693) of the target's path relative to ``ROOT`` (``/``-separated, file-system
    bytes). The journal's header also records that path, so a resume never mixes targets.

``ROOT`` is the daemon user's docroot (the name ``.fallback`` at its top is reserved:
never listed, served, walked or accepted as a target), and for a client download the
folder that receives the transfer root (the destination folder), removed again
(``StateDir.tidy``) once it holds nothing. A user's own folder named ``.fallback`` deeper
in a tree is just a folder: only a folder that carries our marker is ours (``is_state_dir``)
and is skipped when a tree is sent.

One folder per root, rather than one per target folder or one per daemon: it is on the
same file system as the targets in the normal case, so publishing a finished file is still
one atomic ``rename`` (a daemon-wide folder, e.g. ``server/state_dir``, could be on another
disk); and it keeps the user's folders free of anything of ours. When a target is on
another file system than its root's state folder (a mount point under the docroot), the
rename fails with ``EXDEV`` and ``StateDir.publish`` copies the partial into a hidden
temporary file in the target's folder (named ``.<random><partial_file_suffix>``, the only
in-progress file of ours that ever appears among the user's files), then renames that.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from transport.errors import ConflictError, ErrorKind, PathError

STATE_DIR: Final = ".fallback"
"""The state folder's name at the top of its root (also the daemon's reserved URL prefix)."""
MARKER: Final = "README"
MAGIC: Final = b"fallback state folder v1\n"
"""First line of the marker: a folder named ``.fallback`` without it is a user's folder."""
PARTS: Final = "parts"
PARTIAL_SUFFIX: Final = ".fallback-partial"
"""Default ``file_system/partial_file_suffix``: names the cross-device commit's temporary file."""
_README: Final = MAGIC + (
    b"\nThis folder belongs to fallback (file transfers). parts/ holds the partial files and\n"
    b"journals of transfers that have not finished, so that they can resume. Nothing in it\n"
    b"is a user file; it is never listed, served or sent. Delete it only when no transfer\n"
    b"into this folder runs: the transfers it belongs to then start over.\n"
)
_SETTLE: Final = 1.0
"""Seconds a client waits for a ``.fallback`` without its marker to become ours (another
process creating or tidying it) before calling it a user's folder in the way."""


def is_state_dir(path: Path) -> bool:
    """Whether ``path`` is a state folder of ours: named ``.fallback`` and holding the marker."""
    if path.name != STATE_DIR:
        return False
    try:
        with open(path / MARKER, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def in_state_dir(path: Path) -> bool:
    """Whether ``path`` or one of its ancestors is a state folder of ours."""
    p = Path(os.path.abspath(path))
    return any(is_state_dir(q) for q in (p, *p.parents) if q.name == STATE_DIR)


def crosses_state_dir(root: Path, path: Path) -> bool:
    """Whether ``path`` or one of its ancestors below ``root`` is a *marked* state folder
    (``is_state_dir``), by name or through symlinks (the real path of its deepest
    existing ancestor, below the real ``root``). A daemon refuses such paths whoever's
    state folder it is: a docroot nested in another user's holds one the outer user
    must not read or write."""
    def marked(p: Path, top: Path) -> bool:
        return any(q.name == STATE_DIR and is_state_dir(q)
                   for q in (p, *p.parents) if top in q.parents)

    if marked(Path(os.path.abspath(path)), Path(os.path.abspath(root))):
        return True
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    return marked(Path(os.path.realpath(probe)), Path(os.path.realpath(root)))


@dataclass(frozen=True, slots=True)
class StateDir:
    """The state folder for the targets under ``root``.

    ``adopt``: a ``.fallback`` already at the top of ``root`` is ours even without the
    marker (on a daemon, whose docroot reserves the name); otherwise (a client's download
    destination) such a folder is the user's and ``ensure`` refuses to write into it.
    ``suffix`` is ``partial_file_suffix``, for the cross-device commit's temporary file.
    """

    root: Path
    suffix: str = PARTIAL_SUFFIX
    adopt: bool = False

    @property
    def path(self) -> Path:
        return self.root / STATE_DIR

    @property
    def parts(self) -> Path:
        return self.path / PARTS

    def relpath(self, target: Path) -> str:
        """``target`` relative to ``root``, ``/``-separated; ``PathError`` unless strictly below
        it and outside the state folder."""
        try:
            rel = target.relative_to(self.root)
        except ValueError:
            raise PathError(f"{target}: not below {self.root}", kind=ErrorKind.BAD_REQUEST) from None
        if not rel.parts or rel.parts[0] == STATE_DIR:
            raise PathError(f"{target.name or target}: that name is reserved")
        return rel.as_posix()

    def key(self, target: Path) -> str:
        """32 hex digits naming ``target``'s files: BLAKE2b-128 (RFC 7693) of its relpath."""
        return hashlib.blake2b(os.fsencode(self.relpath(target)), digest_size=16).hexdigest()

    def partial(self, target: Path) -> Path:
        return self.parts / f"{self.key(target)}.partial"

    def journal(self, target: Path) -> Path:
        return self.parts / f"{self.key(target)}.journal"

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is the state folder or inside it, by name or through symlinks
        (the real path of its deepest existing ancestor). ``path`` is spelled like ``root``
        (both absolute, or both relative to the working folder)."""
        if path == self.path or self.path in path.parents:
            return True
        probe = path
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        real = Path(os.path.realpath(probe))
        mine = Path(os.path.realpath(self.root)) / STATE_DIR
        return real == mine or mine in real.parents

    # -- life cycle -------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the state folder (marker first, then ``parts/``) unless it exists.

        Raises ``ConflictError`` when a file, or (without ``adopt``) a folder of the user's,
        already has the name ``.fallback`` at the top of ``root``.
        """
        deadline = time.monotonic() + _SETTLE
        while True:
            marked = is_state_dir(self.path)
            if marked or self.adopt:
                try:
                    if not marked:
                        self.root.mkdir(parents=True, exist_ok=True)
                        _mkdir(self.path)
                    _mkdir(self.parts)
                    if not marked:
                        _write_marker(self.path)
                    return
                except NotADirectoryError:
                    raise self._in_the_way("a file of that name") from None
                except FileNotFoundError:
                    if time.monotonic() >= deadline:
                        raise
                    continue  # tidied away meanwhile by another process: make it anew
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                self._create()
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self._in_the_way("a file of that name")
            if time.monotonic() >= deadline:
                raise self._in_the_way("a folder of the user's")
            time.sleep(0.02)  # another process may be creating or tidying it right now

    def _create(self) -> None:
        """Make the folder appear complete (marker and ``parts/``) with one ``rename``, so
        another process never sees a ``.fallback`` of ours without its marker."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{STATE_DIR}.{secrets.token_hex(6)}"
        (tmp / PARTS).mkdir(mode=0o700, parents=True)
        try:
            _write_marker(tmp)
            os.chmod(tmp, 0o700)
            os.rename(tmp, self.path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise  # anything else than "someone else made it first"

    def _in_the_way(self, what: str) -> ConflictError:
        return ConflictError(
            f"{self.path}: {what} is in the way of fallback's state folder (where partial "
            "files are kept); move it, or transfer into another folder")

    def tidy(self) -> bool:
        """Remove the state folder if it holds no partial file or journal (a client, after
        its download); returns whether it is gone. A concurrent receiver either finds it
        gone and creates it anew, or keeps it (its journal makes ``parts/`` non-empty)."""
        if not is_state_dir(self.path):
            return not os.path.lexists(self.path)
        try:
            os.rmdir(self.parts)
        except FileNotFoundError:
            pass
        except OSError:
            return False  # not empty: a transfer to resume, or one running
        try:
            os.unlink(self.path / MARKER)
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            # Someone else's file appeared meanwhile (a receiver re-creating parts/): keep
            # the folder recognisable as ours.
            _write_marker(self.path)
            return False
        return True

    # -- commit ------------------------------------------------------------------------------------
    def publish(self, partial: Path, target: Path, *, replace: bool) -> None:
        """Move a finished ``partial`` to ``target`` atomically: ``rename`` (``replace``) or
        ``link`` then unlink (fails with ``ConflictError`` if ``target`` appeared).

        Across file systems (``EXDEV``) the partial is first copied, synced, into a hidden
        temporary file beside ``target`` with the partial's mode and times.
        """
        try:
            _place(partial, target, replace)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        tmp = target.with_name(f".{secrets.token_hex(8)}{self.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(partial, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            shutil.copystat(partial, tmp)
            _place(tmp, target, replace)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        partial.unlink()


def _mkdir(path: Path) -> None:
    """``mkdir``, for a folder that may exist. (``Path.mkdir(exist_ok=True)`` re-checks an
    existing name with ``is_dir`` and, when a tidy removed it in between, raises.) A file in
    the way surfaces as ``NotADirectoryError`` on the next step below it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _place(src: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(src, target)
        return
    try:
        os.link(src, target)
    except FileExistsError:
        raise ConflictError(f"{target.name}: exists and overwrite is not allowed") from None
    os.unlink(src)


def _write_marker(folder: Path) -> None:
    """Write the marker whole or not at all (a reader never sees half of it)."""
    tmp = folder / f".{MARKER}.{secrets.token_hex(6)}"
    try:
        with open(tmp, "xb") as f:
            f.write(_README)
        os.replace(tmp, folder / MARKER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

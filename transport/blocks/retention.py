"""Removing abandoned partial files from a state folder (``ROOT/.fallback/parts``).

A transfer that never comes back leaves its partial file and journal in the state folder
(``transport.blocks.statedir``) for ever. ``sweep_parts`` removes those not written for
``older_than`` seconds, a bounded batch per call, and never one that is in use:

* a pair (``<h>.partial``, ``<h>.journal``) is a candidate only when every one of its
  files that exists is a regular file last modified at least ``older_than`` seconds ago;
* a key the caller names as ``claimed`` (the targets of its live sessions, even those
  that only planned so far) is kept;
* the journal's ``flock`` is taken (``LOCK_NB``) before anything is removed, and held
  while both files are: a receiver holds that lock for as long as it writes (it takes it
  before it touches the partial, ``transport.blocks.receiver``), so a pair being written
  is kept, and a receiver that starts on the pair at that instant is refused cleanly
  (``ConflictError``, "another transfer is writing this file") instead of writing into
  an unlinked file. Under the lock the ages are checked again;
* a partial without a journal is a one-block file's, written by a group commit
  (``transport.blocks.inline``), which holds no journal but a shared ``flock`` on
  ``parts/`` itself while it writes and publishes: such a partial is removed only
  while the sweep holds that lock exclusively (``LOCK_NB``, taken once per call and
  held to its end), so a group in flight keeps its partials (their mtimes are already
  the sources', often old) and a group that a kill cut short loses them.

Everything is done relative to a descriptor of ``parts/`` opened without following
symlinks, so a symlink planted as ``.fallback`` or ``parts`` or in place of a file never
leads the sweep outside the state folder. Blocking calls: run it off the event loop.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from transport.blocks.statedir import PARTS, STATE_DIR

__all__ = ["SweepResult", "sweep_parts"]

_NAME = re.compile(r"([0-9a-f]{32})\.(partial|journal)")
"""The names ``StateDir`` gives: 32 hex digits (BLAKE2b-128 of the target's path) and
a kind. Anything else in ``parts/`` is not ours to judge and is left alone."""


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one ``sweep_parts`` call did. ``cursor`` is the key to pass as ``after`` next
    time ("" once the end of the folder was reached: the next call starts again)."""

    examined: int  # keys looked at (at most ``limit``)
    removed: int  # pairs removed
    freed: int  # bytes of the files removed
    kept: int  # pairs old enough but in use (claimed, or their lock held)
    cursor: str


def sweep_parts(root: Path, *, older_than: float, now: float,
                claimed: Callable[[], Collection[str]], limit: int = 256,
                after: str = "") -> SweepResult:
    """Remove pairs of ``root``'s state folder not modified for ``older_than`` seconds
    before ``now`` (seconds since the epoch, as ``st_mtime``), examining at most ``limit``
    keys in sorted order, starting after the key ``after``.

    ``claimed`` gives the keys that live sessions may write (``StateDir.key`` of their
    targets); it is called at most once, and only when an old pair was found. A folder
    that does not exist (nothing was ever received there) is an empty result.
    Costs one ``listdir`` of ``parts/`` plus at most ``limit`` pairs of ``stat`` calls.
    """
    if older_than <= 0 or limit < 1:
        raise ValueError("older_than and limit must be positive")
    try:
        dfd = _open_parts(root)
    except (FileNotFoundError, NotADirectoryError):
        return SweepResult(0, 0, 0, 0, "")
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink in place of a folder: not ours to sweep
            return SweepResult(0, 0, 0, 0, "")
        raise
    try:
        keys = sorted({m.group(1) for n in os.listdir(dfd) if (m := _NAME.fullmatch(n))})
        start = bisect.bisect_right(keys, after) if after else 0
        batch = keys[start:start + limit]
        cursor = batch[-1] if start + limit < len(keys) else ""
        cutoff = now - older_than
        live: Collection[str] | None = None
        groups = _GroupLock(dfd)
        removed = freed = kept = 0
        for key in batch:
            if not _old(dfd, key, cutoff):
                continue
            if live is None:
                live = frozenset(claimed())
            if key in live:
                kept += 1
                continue
            got = _remove(dfd, key, cutoff, groups)
            if got is None:
                kept += 1
            else:
                removed += 1
                freed += got
        return SweepResult(len(batch), removed, freed, kept, cursor)
    finally:
        os.close(dfd)


def _open_parts(root: Path) -> int:
    """A descriptor of ``root/.fallback/parts``, following no symlink in the last two steps."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(root / STATE_DIR, flags)
    try:
        return os.open(PARTS, flags, dir_fd=top)
    finally:
        os.close(top)


def _lstat(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _old(dfd: int, key: str, cutoff: float) -> bool:
    """Whether the pair has a file, every file of it is regular and none is newer than
    ``cutoff``."""
    found = False
    for kind in ("partial", "journal"):
        st = _lstat(dfd, f"{key}.{kind}")
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
            return False
        found = True
    return found


class _GroupLock:
    """The exclusive ``flock`` on ``parts/`` that no group commit may hold meanwhile, taken
    at the first lone partial and held until the sweep's descriptor closes."""

    def __init__(self, dfd: int) -> None:
        self._dfd = dfd
        self._held: bool | None = None

    def held(self) -> bool:
        if self._held is None:
            try:
                fcntl.flock(self._dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
            except BlockingIOError:
                self._held = False  # a group is being written: lone partials wait
        return self._held


def _remove(dfd: int, key: str, cutoff: float, groups: _GroupLock) -> int | None:
    """Remove the pair under its journal's lock; the bytes freed, or None when it is in
    use (the lock is held, or it changed since it was judged old). A lone partial also
    needs the ``groups`` lock (no group commit in flight)."""
    journal, partial = f"{key}.journal", f"{key}.partial"
    if _lstat(dfd, journal) is None and not groups.held():
        return None  # a one-block file's partial, maybe of a group being written
    opened = _open_journal(dfd, journal)
    if opened is None:
        return None
    jfd, created = opened
    try:
        try:
            fcntl.flock(jfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a receiver is writing it
        if created and not groups.held():
            os.unlink(journal, dir_fd=dfd)  # ours, still locked: leave nothing behind
            return None
        held = os.fstat(jfd)
        now_at = _lstat(dfd, journal)
        if now_at is None or not os.path.samestat(held, now_at):
            return None  # removed or replaced meanwhile (a commit, another sweep)
        part = _lstat(dfd, partial)
        if (not created and held.st_mtime > cutoff) or (part is not None and (
                not stat.S_ISREG(part.st_mode) or part.st_mtime > cutoff)):
            if created:
                os.unlink(journal, dir_fd=dfd)  # ours, still locked: leave nothing behind
            return None  # written since it was judged old
        freed = held.st_size + (part.st_size if part is not None else 0)
        if part is not None:
            os.unlink(partial, dir_fd=dfd)
        os.unlink(journal, dir_fd=dfd)
        return freed
    finally:
        os.close(jfd)  # drops the lock


def _open_journal(dfd: int, name: str) -> tuple[int, bool] | None:
    """``(fd, created)`` of the pair's journal: the existing one, or (a lone partial) a new
    empty one to hold the lock on, as a receiver locks that same name before anything
    else. Never through a symlink (``O_NOFOLLOW``); None if it cannot be opened."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(2):
        try:
            return os.open(name, flags, dir_fd=dfd), False
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd), True
        except FileExistsError:
            continue  # a receiver made it just now: open that one
        except OSError:
            return None
    return None

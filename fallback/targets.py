"""Where an upload session's files go on the daemon: the state of each target (what the
plan decides from) and the checks before receivers open (folders created, every target
confined to the docroot, symlinked targets refused).

Both run in a worker thread, once per plan (``target_state`` once per file, with the
folders already resolved shared through ``checked``): at 10,000 files in a folder,
resolving each target's path cost more than the file system, so a folder is resolved
once and its files are looked at with plain strings.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fallback.paths import confine, file_in_the_way, relpath_in
from transport.blocks.digest import digest_path
from transport.blocks.inline import is_inline
from transport.blocks.plan import TargetState
from transport.blocks.receiver import inspect_partial
from transport.blocks.statedir import STATE_DIR, crosses_state_dir
from transport.errors import ConflictError, PathError

if TYPE_CHECKING:
    from fallback.sessions import Session


def target_state(session: Session, index: int, *, want_root: bool,
                 checked: set[str] | None = None) -> TargetState:
    """What the daemon holds for entry ``index``: runs in a worker thread (may read the target).

    ``checked``: folders already found inside the docroot and outside any state folder
    (filled here): a target in one of them that is no symlink and not named like the
    state folder needs no path resolution of its own (a batch of 10,000 files in one
    folder resolves that folder once, not 10,000 times)."""
    entry = session.entries[index]
    ts = os.path.join(session.root, *entry.path.split("/")) if entry.path else os.fspath(session.root)
    parent = os.path.dirname(ts)
    fast = checked is not None and parent in checked and os.path.basename(ts) != STATE_DIR
    st: os.stat_result | None = None
    if fast:  # plain strings: at 10,000 files, pathlib cost more than the file system
        try:
            st = os.lstat(ts)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:  # /file/x: a file where one of its folders would be
            raise ConflictError(file_in_the_way(session.docroot, Path(ts))) from None
        fast = st is None or not stat.S_ISLNK(st.st_mode)
    if not fast:
        target = Path(ts)
        state = session.state
        confine(session.docroot, target)
        if state.holds(target) or crosses_state_dir(session.docroot, target):
            raise PathError(f"{relpath_in(session.docroot, target)}: that name is reserved")
        try:
            st = os.lstat(ts)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:  # /file/x: a file where one of its folders would be
            raise ConflictError(file_in_the_way(session.docroot, target)) from None
        if checked is not None and (st is None or not stat.S_ISLNK(st.st_mode)):
            checked.add(parent)  # the target resolved inside, through this folder
    # A one-block file has nothing to resume (it is published whole or not at all):
    # no journal to look for.
    partial = inspect_partial(Path(ts), state=session.state) \
        if not entry.is_dir and not is_inline(entry) else None
    exists = st is not None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    size = st.st_size if st else 0
    root = None
    if want_root and exists and not is_dir and not entry.is_dir and size == entry.stored_size():
        root = digest_path(Path(ts), entry.block_size) if entry.transform == "identity" else None
    return TargetState(
        exists=exists,
        is_dir=is_dir,
        size=size,
        mtime_ns=st.st_mtime_ns if st else 0,
        journal=partial.identity if partial else None,
        have=partial.have if partial else {},
        root=root,
    )


def prepare_targets(session: Session, actions: dict[int, str]) -> dict[int, Path]:
    """Worker thread, one job for the whole plan: create the folders, confine every target
    (its folder resolved once per folder, not once per file) and refuse symlinked targets;
    returns the target of each file to transfer."""
    for i, entry in enumerate(session.entries):
        if entry.is_dir:
            path = session.target(i)
            confine(session.docroot, path)
            if path.exists() and not path.is_dir():
                raise ConflictError(f"{relpath_in(session.docroot, path)}: a file of that name exists")
            path.mkdir(parents=True, exist_ok=True)
    targets: dict[int, Path] = {}
    parents: set[Path] = set()
    for i, action in actions.items():
        if action == "skip":
            continue
        target = session.target(i)
        if target.parent not in parents:
            # A target that is no symlink resolves to its folder's real path plus its name:
            # confining the folder confines the target.
            confine(session.docroot, target.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            parents.add(target.parent)
        if os.path.islink(target):
            raise PathError(f"{relpath_in(session.docroot, target)}: refused, target is a symlink")
        targets[i] = target
    return targets

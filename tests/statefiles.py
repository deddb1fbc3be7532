"""Where a receiver keeps a target's partial file and journal, for the tests that look.

They live in the state folder (``ROOT/.fallback/parts/``) of the tree being written:
the docroot on a daemon, the destination folder of a download on a client.
"""

from __future__ import annotations

from pathlib import Path

from transport.blocks.journal import Journal
from transport.blocks.statedir import STATE_DIR, StateDir, is_state_dir


def ours(target: Path, root: Path | None = None) -> tuple[Path, Path]:
    """``target``'s partial file and journal, in the state folder of ``root``
    (default: ``target``'s own folder)."""
    state = StateDir(root if root is not None else target.parent)
    return state.partial(target), state.journal(target)


def hidden_beside(folder: Path) -> list[str]:
    """Hidden names in ``folder`` other than a state folder of ours."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and not (p.name == STATE_DIR and is_state_dir(p)))


def no_leftovers(target: Path, root: Path | None = None) -> bool:
    """Neither a partial nor a journal of ``target`` is kept, and nothing hidden sits beside it."""
    return hidden_beside(target.parent) == [] and not any(p.exists() for p in ours(target, root))


def parts(root: Path) -> list[str]:
    """The files in ``root``'s state folder (partials and journals), by name."""
    folder = root / STATE_DIR / "parts"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def kept_below(root: Path, folder: Path) -> list[str]:
    """Partials and journals in ``root``'s state folder that belong to targets in ``folder``
    (journals record their target's path; a partial without a journal always counts)."""
    rel = folder.relative_to(root).as_posix()
    found = []
    for name in parts(root):
        path = root / STATE_DIR / "parts" / name
        stem = name.rsplit(".", 1)[0]
        meta, _ = Journal.peek(path.with_name(stem + ".journal"))
        if meta is None:
            found.append(name)  # an orphan, or a journal we cannot read: report it
            continue
        target = str(meta.get("path", ""))
        if rel == "." or target == rel or target.startswith(rel + "/"):
            found.append(name)
    return found

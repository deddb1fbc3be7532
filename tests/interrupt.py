"""Interrupting a transfer at a known point: waits on the receiver's journal.

Shared by the resume and encryption tests, which both kill a side mid-transfer
and then check exactly what the journal had made durable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transport.blocks.journal import Journal
from transport.blocks.receiver import journal_path
from transport.blocks.statedir import StateDir


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def journaled(target: Path, root: Path | None = None) -> dict[int, bytes]:
    """Blocks ``target``'s journal records (read without its lock); it is kept in the state
    folder of ``root``, the tree's top (default: ``target``'s own folder)."""
    return Journal.peek(journal_path(target, StateDir(root or target.parent)))[1]


def wait_journal_stable(target: Path, quiet: float = 0.8,
                        root: Path | None = None) -> dict[int, bytes]:
    """The journal once it stopped growing for ``quiet`` seconds (> the 0.5 s flush interval)."""
    have = journaled(target, root)
    since = time.monotonic()
    deadline = since + 30
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "journal never settled"
        time.sleep(0.05)
        now = journaled(target, root)
        if now != have:
            have, since = now, time.monotonic()
    return have

"""The daemon's sweep of abandoned partial files (``file_system/partial_file_retention``).

A transfer into a docroot that never comes back leaves its partial file and journal in
the docroot's state folder (``.fallback/parts``). ``PartialSweeper`` removes those not
written for ``partial_file_retention`` seconds (0: never), with
``transport.blocks.retention.sweep_parts``:

* a pass at start, then every ``SWEEP_INTERVAL`` seconds (an hour; sooner, half the
  retention, when the retention is shorter than two hours);
* bounded work per pass: at most ``SWEEP_PASS_MAX`` partials per docroot, in executor
  jobs of ``SWEEP_BATCH`` (other requests interleave on the shared I/O pool); a cursor
  per docroot carries on where the last pass stopped, so a large folder is covered
  over several passes;
* never a partial of a live session: the targets of every open upload session of the
  docroot are claimed (even one that has only planned), and a receiver's journal lock
  is respected (``sweep_parts``);
* one log line per docroot and pass that removed something.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Collection
from pathlib import Path

from fallback.config import Config
from fallback.daemonctx import DaemonState
from fallback.sessions import Session
from transport.blocks.retention import sweep_parts

log = logging.getLogger("fallback.daemon")

SWEEP_INTERVAL = 3600.0
"""Seconds between two passes (at most)."""
SWEEP_MIN_INTERVAL = 1.0
"""Seconds between two passes at least, whatever the retention."""
SWEEP_BATCH = 256
"""Partials (pairs of partial file and journal) one executor job examines."""
SWEEP_PASS_MAX = 4096
"""Partials examined per docroot per pass."""


def sweep_interval(retention: int) -> float:
    """Seconds until the next pass for a retention of ``retention`` seconds: an hour, or
    half the retention when that is shorter (an abandoned partial then stays at most 1.5
    times its retention), never under ``SWEEP_MIN_INTERVAL``."""
    if retention <= 0:
        return SWEEP_INTERVAL
    return max(SWEEP_MIN_INTERVAL, min(SWEEP_INTERVAL, retention / 2))


def docroots(config: Config) -> list[Path]:
    """Every docroot the daemon writes into, once each."""
    roots = [u.docroot for u in config.users]
    if config.default_docroot is not None:
        roots.append(config.default_docroot)
    return list(dict.fromkeys(Path(r) for r in roots))


def claimed_keys(sessions: list[Session], docroot: Path) -> Collection[str]:
    """The state-folder keys of every file target of the given open upload sessions of
    ``docroot`` (run in a worker thread: O(entries of those sessions))."""
    out: set[str] = set()
    for s in sessions:
        if s.docroot != docroot:
            continue
        state = s.state
        for i in s.file_indices():
            try:
                out.add(state.key(s.target(i)))
            except Exception:  # noqa: BLE001 - a target outside the root claims nothing
                continue
    return out


class PartialSweeper:
    """Runs the sweeps of one daemon (``run`` is its task), on its I/O executor."""

    def __init__(self, state: DaemonState) -> None:
        self.state = state
        self.cursors: dict[Path, str] = {}
        self.removed = 0  # pairs removed since start
        self.freed = 0  # bytes

    async def run(self) -> None:
        """A pass now, then one every ``sweep_interval``; ``config`` is re-read each time
        (a SIGHUP may change the retention)."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed pass must not end the sweeps
                log.warning("partial sweep failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(sweep_interval(self.state.config.partial_file_retention))

    async def sweep(self) -> int:
        """One pass over every docroot; returns the pairs removed."""
        config = self.state.config
        retention = config.partial_file_retention
        if retention <= 0:
            return 0
        loop = asyncio.get_running_loop()
        total = 0
        for root in docroots(config):
            removed = freed = examined = 0
            while examined < SWEEP_PASS_MAX:
                # Snapshot on the event loop: the worker must not iterate the live table.
                live = [s for s in self.state.table.sessions.values()
                        if s.direction == "upload" and not s.closed]
                job = functools.partial(
                    sweep_parts, root, older_than=retention, now=time.time(),
                    claimed=functools.partial(claimed_keys, live, root), limit=SWEEP_BATCH,
                    after=self.cursors.get(root, ""))
                result = await loop.run_in_executor(self.state.executor, job)
                self.cursors[root] = result.cursor
                removed += result.removed
                freed += result.freed
                examined += result.examined
                if not result.cursor:  # reached the end of the folder
                    break
            if removed:
                log.info("removed %d abandoned partial files (%d bytes) not written for %d s "
                         "from %s/.fallback/parts (partial_file_retention)", removed, freed,
                         retention, root)
            total += removed
            self.removed += removed
            self.freed += freed
        return total

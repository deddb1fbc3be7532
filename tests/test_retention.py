"""Abandoned partial files are removed after ``file_system/partial_file_retention``; a
partial of a live session never is (transport.blocks.retention, fallback.sweeper)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fallback.sweeper import sweep_interval
from tests.control_client import entry, start_daemon
from transport.blocks.digest import block_digest
from transport.blocks.inline import InlineTarget, commit_group
from transport.blocks.journal import Journal
from transport.blocks.manifest import FileEntry
from transport.blocks.retention import sweep_parts
from transport.blocks.statedir import StateDir

DAY = 86400.0


def _pair(root: Path, name: str, *, age: float, journal: bool = True, partial: bool = True,
          size: int = 1000) -> tuple[Path, Path]:
    """A partial file and journal as a receiver leaves them for target ``root/name``,
    last written ``age`` seconds ago."""
    st = StateDir(root, adopt=True)
    st.ensure()
    target = root / name
    p, j = st.partial(target), st.journal(target)
    when = time.time() - age
    for path, make in ((p, partial), (j, journal)):
        if make:
            path.write_bytes(b"x" * size)
            os.utime(path, (when, when))
    return p, j


def _none(root: Path, *names: str) -> bool:
    st = StateDir(root, adopt=True)
    return not any(st.partial(root / n).exists() or st.journal(root / n).exists() for n in names)


def _all(root: Path, *names: str) -> bool:
    st = StateDir(root, adopt=True)
    return all(st.journal(root / n).exists() for n in names)


def test_old_pairs_go_young_claimed_and_locked_ones_stay(tmp_path: Path) -> None:
    root = tmp_path / "docroot"
    root.mkdir()
    _pair(root, "old.bin", age=8 * DAY)
    _pair(root, "lone-partial.bin", age=8 * DAY, journal=False)
    _pair(root, "lone-journal.bin", age=8 * DAY, partial=False)
    _pair(root, "young.bin", age=6 * DAY)
    _pair(root, "half-young.bin", age=8 * DAY)
    os.utime(StateDir(root).partial(root / "half-young.bin"))  # its partial written just now
    _pair(root, "claimed.bin", age=8 * DAY)
    _, locked_journal = _pair(root, "locked.bin", age=8 * DAY)
    stranger = StateDir(root).parts / "notes.txt"
    stranger.write_text("not ours to judge")
    os.utime(stranger, (0, 0))
    claimed = {StateDir(root).key(root / "claimed.bin")}
    asked: list[int] = []

    def live() -> set[str]:
        asked.append(1)
        return claimed

    held = Journal.open(locked_journal, {"v": 1}, keep=False)  # a receiver writing it
    os.utime(locked_journal, (time.time() - 8 * DAY,) * 2)
    try:
        got = sweep_parts(root, older_than=7 * DAY, now=time.time(), claimed=live)
    finally:
        held.close()
    assert _none(root, "old.bin", "lone-partial.bin", "lone-journal.bin")
    assert _all(root, "young.bin", "half-young.bin", "claimed.bin", "locked.bin")
    assert StateDir(root).partial(root / "claimed.bin").exists()
    assert stranger.exists()
    assert (got.examined, got.removed, got.kept, got.cursor) == (7, 3, 2, "")
    assert got.freed == 4 * 1000  # two files of the pair, one each of the lone ones
    assert asked == [1]  # the live set is computed once, and only because old pairs exist


def test_each_call_examines_a_bounded_batch_and_carries_on(tmp_path: Path) -> None:
    root = tmp_path / "docroot"
    root.mkdir()
    names = [f"f{i}.bin" for i in range(10)]
    for n in names:
        _pair(root, n, age=8 * DAY)
    seen, after = [], ""
    for _ in range(3):
        got = sweep_parts(root, older_than=7 * DAY, now=time.time(), claimed=set, limit=4,
                          after=after)
        seen.append((got.examined, got.removed))
        after = got.cursor
    assert seen == [(4, 4), (4, 4), (2, 2)] and after == ""
    assert _none(root, *names)


def test_symlinks_never_lead_the_sweep_out(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _pair(elsewhere, "precious.bin", age=8 * DAY)
    root = tmp_path / "docroot"
    root.mkdir()
    (root / ".fallback").symlink_to(elsewhere / ".fallback")  # a planted state folder
    got = sweep_parts(root, older_than=7 * DAY, now=time.time(), claimed=set)
    assert got.examined == 0 and _all(elsewhere, "precious.bin")
    root2 = tmp_path / "docroot2"
    root2.mkdir()
    st = StateDir(root2, adopt=True)
    st.ensure()
    target = elsewhere / "victim"
    target.write_bytes(b"v")
    os.utime(target, (0, 0))
    st.partial(root2 / "x.bin").symlink_to(target)  # a symlink in place of a partial
    got = sweep_parts(root2, older_than=7 * DAY, now=time.time(), claimed=set)
    assert got.removed == 0 and target.read_bytes() == b"v"
    assert not st.journal(root2 / "x.bin").exists()  # and nothing of ours left behind


def test_a_group_in_flight_keeps_its_lone_partials(tmp_path: Path) -> None:
    """One-block files have no journal: their partials (already carrying the sources' old
    mtimes) are kept while a group commit holds ``parts/`` (shared flock), and go once no
    group is in flight; pairs with a journal are judged as before meanwhile."""
    root = tmp_path / "docroot"
    root.mkdir()
    _pair(root, "grouped.bin", age=8 * DAY, journal=False)
    _pair(root, "abandoned.bin", age=8 * DAY)
    st = StateDir(root, adopt=True)
    group = os.open(st.parts, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(group, fcntl.LOCK_SH)  # as commit_group holds it
        got = sweep_parts(root, older_than=7 * DAY, now=time.time(), claimed=set)
        assert (got.removed, got.kept) == (1, 1)
        assert st.partial(root / "grouped.bin").exists()
        assert not st.journal(root / "grouped.bin").exists()  # nothing of ours left behind
        assert _none(root, "abandoned.bin")
    finally:
        os.close(group)
    got = sweep_parts(root, older_than=7 * DAY, now=time.time(), claimed=set)
    assert got.removed == 1 and _none(root, "grouped.bin")  # a killed group's: swept


def test_group_commits_racing_the_sweep_publish_every_file(tmp_path: Path) -> None:
    """A sweep with a one-second retention running all the time beside group commits of
    files whose mtimes are years old never takes a partial from under a group: every
    file is published whole, and nothing is left in the state folder."""
    root = tmp_path / "docroot"
    root.mkdir()
    state = StateDir(root, adopt=True)
    old = 1_000_000_000 * 10**9
    stop = threading.Event()
    swept = [0]

    def sweeper() -> None:
        while not stop.wait(0.002):  # (back to back, its exclusive lock would starve them)
            swept[0] += sweep_parts(root, older_than=1.0, now=time.time(), claimed=set).removed

    items = []
    for i in range(400):
        data = f"file {i} ".encode() * 50
        e = FileEntry(f"f{i}", "file", size=len(data), mtime_ns=old, mode=0o644,
                      block_size=1 << 16)
        items.append((i, InlineTarget(root / f"f{i}", e), data, block_digest(data)))
    t = threading.Thread(target=sweeper)
    t.start()
    try:
        results = [commit_group(items[k:k + 20], state, fsync=False, replace=True)
                   for k in range(0, len(items), 20)]
    finally:
        stop.set()
        t.join()
    assert all(not r.errors and not r.failed for r in results)
    assert sum(len(r.done) for r in results) == len(items)
    for i, _, data, _ in items:
        assert (root / f"f{i}").read_bytes() == data
    assert swept[0] == 0 and not list(state.parts.iterdir())


def test_interval_follows_the_retention() -> None:
    assert sweep_interval(7 * 86400) == 3600.0
    assert sweep_interval(600) == 300.0
    assert sweep_interval(1) == 1.0
    assert sweep_interval(0) == 3600.0


async def test_daemon_sweeps_at_start_and_spares_a_live_session(tmp_path: Path,
                                                                 api_for: Any) -> None:
    """An orphan present at start is swept by the first pass; an old partial whose target
    a live upload session names stays until that session ends, then goes."""
    base = tmp_path / "d"
    docroot = base / "docroot" / "alice"
    docroot.mkdir(parents=True)
    _pair(docroot, "orphan.bin", age=10.0)
    d = start_daemon(base, {"alice": (True, True)},
                     "<partial_file_retention>4</partial_file_retention>")  # a pass every 2 s
    try:
        await _logged(d, "removed 1 abandoned partial files (2000 bytes) not written for 4 s")
        assert _none(docroot, "orphan.bin")
        api = api_for(d)
        s = await api.open("alice", {  # the client of resumable.bin came back
            "direction": "upload", "path": "/resumable.bin", "into_dir": False, "name": "",
            "entries": [entry()], "overwrite": "always", "encrypt": False,
            "strong_pass": False})
        _pair(docroot, "resumable.bin", age=10.0)  # (it has not planned yet)
        await asyncio.sleep(5)  # two passes or more: the live session's partial stays
        assert _all(docroot, "resumable.bin"), d.log()[-2000:]
        assert StateDir(docroot).partial(docroot / "resumable.bin").exists()
        assert d.log().count("abandoned partial files") == 1
        assert (await api.call(s, "DELETE", "", {})).status == 200
        await _logged(d, "abandoned partial files", count=2)
        assert _none(docroot, "resumable.bin")
        assert "Traceback" not in d.log()
    finally:
        d.stop()


async def _logged(d: Any, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while d.log().count(text) < count:
        assert time.monotonic() < deadline, d.log()[-2000:]
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_retention_must_be_a_number_of_seconds(tmp_path: Path, value: str) -> None:
    from fallback.config import ConfigError, load_config

    conf = tmp_path / "aspera.conf"
    conf.write_text(f'<CONF version="2"><file_system><partial_file_retention>{value}'
                    "</partial_file_retention></file_system></CONF>")
    with pytest.raises(ConfigError) as caught:
        load_config(conf)
    assert "partial_file_retention" in str(caught.value.problems[0])


def test_retention_defaults_to_seven_days(tmp_path: Path) -> None:
    from fallback.config import embedded_defaults, load_config

    assert embedded_defaults(tmp_path).partial_file_retention == 7 * 86400
    conf = tmp_path / "aspera.conf"
    conf.write_text('<CONF version="2"><file_system><partial_file_retention>0'
                    "</partial_file_retention></file_system></CONF>")
    assert load_config(conf).partial_file_retention == 0  # keep for ever

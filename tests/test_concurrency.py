"""Two writers, one target; a killed client re-run at once (issue #2, sections 2 and 7).

A target has one writer at a time: the daemon's session table and the journal's
``flock`` make a second transfer to the same file fail clearly (exit 1,
"another transfer is writing this file") or wait, never interleave. A session
whose client was killed holds the lock only until it has been idle for
``IDLE_TAKEOVER`` seconds, so re-running the killed client resumes at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fallback.sessions import IDLE_TAKEOVER
from tests.conftest import Daemon, make_file, sha256
from tests.test_resume import (
    AT,
    BS,
    FIRST,
    NO_FSYNC_XML,
    SIZE,
    UP,
    assert_resumed,
    journaled,
    kill,
    leftovers,
    module_daemon,
    start_transfer,
    wait_journal_stable,
    wait_progress,
    wait_until,
)
from transport.blocks.digest import digest_path
from transport.blocks.journal import Journal
from transport.blocks.receiver import journal_path, partial_path
from transport.errors import ConflictError

BUSY = "another transfer is writing this file"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module; each test writes its own file name."""
    yield from module_daemon(tmp_path_factory, NO_FSYNC_XML)


@pytest.fixture
def sources(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """Two sources of the same size and name (the test's), different content."""
    name = request.node.name.removeprefix("test_")[:60] + ".bin"
    return (make_file(tmp_path / "a" / name, SIZE, seed=1),
            make_file(tmp_path / "b" / name, SIZE, seed=2))


def finish(proc) -> tuple[int, dict, str]:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {}, err


def assert_busy(rc: int, res: dict, err: str) -> None:  # type: ignore[type-arg]
    """Exit 1, one clear line on stderr, the JSON result saying the same."""
    assert rc == 1, (rc, res, err)
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ") and BUSY in err
    assert res["ok"] is False and BUSY in res["error"] and res["sent_bytes"] == 0


def test_second_upload_to_a_busy_target_fails_clearly(d: Daemon, sources: tuple[Path, Path]) -> None:
    name = sources[0].name
    a_src, b_src = sources
    target = d.docroots["alice"] / name
    a = start_transfer(d, str(a_src), d.url(f"/{name}"), *UP)
    wait_progress(a, target, AT)
    a.send_signal(signal.SIGSTOP)  # A holds the target with its streams open, mid-transfer
    try:
        t0 = time.monotonic()
        rc, res, err = d.transfer(str(b_src), d.url(f"/{name}"), *UP, check=False)
        assert_busy(rc, res, err)
        assert res["error"] == f"remote /{name}: {BUSY}"
        assert time.monotonic() - t0 < IDLE_TAKEOVER + 10  # it waited a little, then gave up
    finally:
        a.send_signal(signal.SIGCONT)
    rc, res, err = finish(a)
    assert (rc, res["ok"], err) == (0, True, "")
    assert sha256(target) == sha256(a_src)  # A's file, whole: B wrote nothing into it
    assert leftovers(target.parent) == []
    # the daemon is still up and serves the next transfer: B's, now that the target is free
    rc, res, err = d.transfer(str(b_src), d.url(f"/{name}"), *UP)
    assert res["ok"] and res["sent_bytes"] == SIZE
    assert sha256(target) == sha256(b_src)
    assert f"/{name}: {BUSY}" in d.log() and "Traceback" not in d.log()


def test_two_uploads_racing_for_one_target_never_mix(d: Daemon, sources: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    name = sources[0].name
    a_src, b_src = sources
    target = d.docroots["alice"] / name
    procs = [start_transfer(d, str(s), d.url(f"/{name}"), *UP) for s in sources]
    outcomes = [finish(p) for p in procs]
    ok = [i for i, (rc, _, _) in enumerate(outcomes) if rc == 0]
    assert ok, outcomes
    for rc, res, err in outcomes:
        if rc != 0:
            assert_busy(rc, res, err)
        else:
            assert res["ok"] and err == ""
    assert sha256(target) in {sha256(a_src), sha256(b_src)}
    assert leftovers(target.parent) == []
    # the daemon stays up: a third transfer (a download of what won) works
    rc, res, err = d.transfer(d.url(f"/{name}"), str(tmp_path / "third.bin"))
    assert res["ok"] and sha256(tmp_path / "third.bin") == sha256(target)
    assert "Traceback" not in d.log()


def test_second_download_into_a_busy_local_target_fails_clearly(d: Daemon, sources: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    name = sources[0].name
    shutil.copy2(sources[0], d.docroots["alice"] / name)
    target = tmp_path / "dl" / name
    target.parent.mkdir()
    a = start_transfer(d, d.url(f"/{name}"), str(target))
    wait_progress(a, target, AT)
    a.send_signal(signal.SIGSTOP)
    try:
        rc, res, err = d.transfer(d.url(f"/{name}"), str(target), check=False)
        assert_busy(rc, res, err)
        assert res["error"] == f"{name}: {BUSY}"
    finally:
        a.send_signal(signal.SIGCONT)
    rc, res, err = finish(a)
    assert (rc, res["ok"]) == (0, True)
    assert sha256(target) == sha256(sources[0])
    assert leftovers(target.parent) == []


def test_client_killed_mid_upload_and_rerun_at_once_resumes(d: Daemon,
                                                           sources: tuple[Path, Path]) -> None:
    """No freezing here: kill -9 while blocks are in flight, then run again straight away."""
    name = sources[0].name
    src = sources[0]
    target = d.docroots["alice"] / name
    a = start_transfer(d, str(src), d.url(f"/{name}"), *UP)
    wait_progress(a, target, 2 * AT)
    kill(a)
    have = journaled(target)  # what the killed run got journaled (more may land: in flight)
    t0 = time.monotonic()
    rc, res, err = d.transfer(str(src), d.url(f"/{name}"), *UP)
    took = time.monotonic() - t0
    assert rc == 0 and err == ""
    assert 0 < res["skipped_bytes"] and res["sent_bytes"] + res["skipped_bytes"] == SIZE
    assert res["sent_bytes"] <= SIZE - len(have) * BS + (4 * 2 + 2) * BS
    assert res["checksums"] == {name: digest_path(src, BS)}
    assert sha256(target) == sha256(src)
    assert leftovers(target.parent) == []
    assert took < IDLE_TAKEOVER + 8, f"re-run took {took:.1f} s"
    assert re.search(rf"path=/{re.escape(name)} .*result=error: taken over by a newer session "
                     "for the same target$", d.log(), re.M)


def test_rerun_while_the_killed_clients_last_blocks_land(d: Daemon,
                                                         sources: tuple[Path, Path]) -> None:
    """The daemon journals blocks after it told the re-run what it holds.

    A (frozen mid-upload) holds the target; B, the same upload, opens its
    session and waits for A's lock; A thaws, sends more blocks and is killed.
    B takes over a partial holding blocks B's open did not report: it must
    still commit (it once failed with a whole-file digest mismatch and lost
    the partial). B's wait is bounded, so if A's kill came too late for it the
    run is repeated.
    """
    name = sources[0].name
    src = sources[0]
    target = d.docroots["alice"] / name
    for _attempt in range(3):
        for path in (target, partial_path(target), journal_path(target)):
            path.unlink(missing_ok=True)
        a = start_transfer(d, str(src), d.url(f"/{name}"), *FIRST)
        wait_progress(a, target, AT)
        a.send_signal(signal.SIGSTOP)
        before = wait_journal_stable(target)
        opened = d.log().count(" opened: ")
        b = start_transfer(d, str(src), d.url(f"/{name}"), *UP)
        wait_until(lambda n=opened: d.log().count(" opened: ") > n, "the re-run's session")
        a.send_signal(signal.SIGCONT)
        time.sleep(0.03)
        kill(a)
        rc, res, err = finish(b)
        if rc == 1 and BUSY in err:
            continue  # A went idle after B's bounded wait: timing, not the case under test
        assert (rc, err) == (0, ""), res
        assert_resumed(res, src, before, name)
        assert sha256(target) == sha256(src)
        assert leftovers(target.parent) == []
        if res["skipped_bytes"] == len(before) * BS:
            continue  # A sent nothing more before it died: not the case under test either
        assert "Traceback" not in d.log()
        return
    pytest.fail("the re-run never overlapped the killed client's last blocks")


def test_journal_lock_is_never_held_on_a_removed_journal(tmp_path: Path) -> None:
    """Writers opening a journal while its holder commits (and removes it) never share it.

    A writer that opened the path just before the holder removed it used to
    get the lock on the removed file and go on as if it held the target's
    lock, next to a writer locking the new file: two writers, one target.
    """
    path = tmp_path / "f.journal"
    deadline = time.monotonic() + 0.6
    held, wrong = [0], [0]

    def writer() -> None:
        while time.monotonic() < deadline:
            try:
                j = Journal.open(path, {"v": 1}, keep=False)
            except ConflictError:
                continue
            try:
                if not os.path.samestat(os.fstat(j._fd), os.stat(path)):
                    wrong[0] += 1
            except FileNotFoundError:
                wrong[0] += 1
            held[0] += 1
            j.close(remove=True)  # as a commit does

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert held[0] > 20 and wrong[0] == 0, (held, wrong)


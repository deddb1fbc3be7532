"""The product's own files live outside the user's namespace (issue #10, item 4).

Partial files and journals are kept in a state folder (``ROOT/.fallback/parts/``, named by
a hash of the target's path): ROOT is the daemon's docroot, or a download's destination
folder. So any user name, even one shaped like ours (``.x.fallback-partial``), is only a
user name; the state folder is never listed, served, sent or accepted as a target; and a
``kill -9`` still resumes from it. Real daemons, real CLI runs, curl where a plain client
is the point.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORDS, Daemon, make_file, sha256
from tests.interrupt import wait_journal_stable, wait_until
from tests.statefiles import hidden_beside, ours, parts
from tests.test_resume import NO_FSYNC_XML, kill, module_daemon, start_transfer
from transport.blocks.digest import digest_path
from transport.blocks.receiver import FileReceiver
from transport.blocks.source import FileSource, entry_for
from transport.blocks.statedir import MAGIC, STATE_DIR, StateDir, is_state_dir
from transport.errors import ConflictError

BS = 256 << 10
SIZE = 16 << 20  # 64 blocks
AT = 2 << 20
RESERVED = {"error": "that name is reserved"}
BUSY = "another transfer is writing this file"
ALICE = f"alice:{PASSWORDS['alice']}"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon (256 KiB blocks) for the module; each test uses its own folder."""
    yield from module_daemon(tmp_path_factory, NO_FSYNC_XML)


@pytest.fixture
def srv(d: Daemon) -> Daemon:
    if d.proc is None or d.proc.poll() is not None:
        d.proc = None
        d.start()
    return d


def curl(d: Daemon, *args: str) -> tuple[int, bytes]:
    """``curl`` against the daemon's HTTP port; returns (HTTP status, body)."""
    p = subprocess.run(["curl", "-sS", "-u", ALICE, "-w", "\n%{http_code}", *args[:-1],
                        f"http://127.0.0.1:{d.http_port}{args[-1]}"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    body, _, code = p.stdout.rpartition(b"\n")
    return int(code), body


def listing(d: Daemon, path: str) -> list[str]:
    code, body = curl(d, path)
    assert code == 200, body
    return list(json.loads(body)["entries"])


def control(d: Daemon, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /.fallback/v1/session`` as any client could send it (Basic auth, JSON)."""
    auth = base64.b64encode(ALICE.encode()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}/.fallback/v1/session",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Basic {auth}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def files(root: Path) -> dict[str, str]:
    """Every file below ``root`` -> sha256 (hidden ones included)."""
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def refused(rc: int, res: dict[str, Any], err: str, message: str) -> None:
    assert rc == 1 and res["ok"] is False, (rc, res, err)
    assert "Traceback" not in err and err.strip() == f"error: {res['error']}"
    assert message in res["error"], res["error"]


# -- user names shaped like ours ------------------------------------------------------------------
def test_a_user_file_named_like_a_partial_does_not_replace_the_downloaded_file(
        srv: Daemon, tmp_path: Path) -> None:
    """``.a.txt.fallback-partial`` put by curl beside ``a.txt``: the download keeps both apart
    (it used to publish the stale file as ``a.txt``, exit 0)."""
    a = make_file(tmp_path / "src" / "a.txt", 5 * BS + 77, seed=1)
    stale = make_file(tmp_path / "p.txt", BS + 5, seed=2)
    rc, res, _ = srv.transfer(str(a), srv.url("/collide/"), "--block-size", "256K")
    assert res["ok"]
    code, _ = curl(srv, "-T", str(stale), "/collide/.a.txt.fallback-partial")
    assert code == 201
    for run in range(3):
        out = tmp_path / f"out{run}"
        rc, res, err = srv.transfer(srv.url("/collide"), str(out) + "/")
        assert (rc, err) == (0, ""), res
        assert files(out / "collide") == {"a.txt": sha256(a), ".a.txt.fallback-partial": sha256(stale)}
        assert not (out / STATE_DIR).exists()  # the client's state folder is gone once empty
        assert res["checksums"] == {"collide/a.txt": digest_path(a, BS),
                                    "collide/.a.txt.fallback-partial": digest_path(stale, BS)}


def test_a_local_folder_with_a_file_named_like_a_partial_uploads_both(srv: Daemon,
                                                                      tmp_path: Path) -> None:
    local = tmp_path / "up"
    a = make_file(local / "a.txt", 5 * BS + 77, seed=3)
    stale = make_file(local / ".a.txt.fallback-partial", BS + 5, seed=4)
    journal = make_file(local / ".a.txt.fallback-journal", 999, seed=5)
    rc, res, err = srv.transfer(str(local), srv.url("/"), "--block-size", "256K")
    assert (rc, err) == (0, ""), res
    served = srv.docroots["alice"] / "up"
    assert files(served) == {"a.txt": sha256(a), ".a.txt.fallback-partial": sha256(stale),
                             ".a.txt.fallback-journal": sha256(journal)}
    assert not any(p.exists() for t in ("a.txt", ".a.txt.fallback-partial", ".a.txt.fallback-journal")
                   for p in ours(served / t, srv.docroots["alice"]))


def test_names_like_ours_are_ordinary_user_files(srv: Daemon, tmp_path: Path) -> None:
    """Upload, list, download and plain GET/PUT treat them like any other name."""
    local = tmp_path / "names"
    made = {n: make_file(local / n, size, seed=i) for i, (n, size) in enumerate([
        ("x", 3 * BS), (".x.fallback-partial", 2 * BS + 1), (".x.fallback-journal", 4000),
        ("sub/.y.fallback-journal", 10), ("sub/y", BS)])}
    rc, res, err = srv.transfer(str(local), srv.url("/"), "--block-size", "256K")
    assert (rc, err) == (0, ""), res
    assert sorted(listing(srv, "/names/")) == [".x.fallback-journal", ".x.fallback-partial",
                                               "sub", "x"]
    assert sorted(listing(srv, "/names/sub/")) == [".y.fallback-journal", "y"]
    code, body = curl(srv, "/names/.x.fallback-journal")
    assert code == 200 and body == made[".x.fallback-journal"].read_bytes()
    # plain PUT of such a name, next to the file it "belongs" to, and back
    code, _ = curl(srv, "-T", str(made["x"]), "/names/sub/.y.fallback-partial")
    assert code == 201
    code, body = curl(srv, "/names/sub/.y.fallback-partial")
    assert code == 200 and body == made["x"].read_bytes()
    out = tmp_path / "out"
    rc, res, err = srv.transfer(srv.url("/names"), str(out) + "/")
    assert (rc, err) == (0, ""), res
    expected = {n: sha256(p) for n, p in made.items()}
    expected["sub/.y.fallback-partial"] = sha256(made["x"])
    assert files(out / "names") == expected
    assert sorted(os.listdir(out)) == ["names"]


def test_old_style_partials_beside_a_file_are_user_files_now(srv: Daemon, tmp_path: Path) -> None:
    """Left by an older daemon: not resumed, not removed, not confused with the target."""
    folder = srv.docroots["alice"] / "old"
    folder.mkdir()
    src = make_file(tmp_path / "big.bin", 8 * BS, seed=6)
    old_partial = folder / ".big.bin.fallback-partial"
    old_journal = folder / ".big.bin.fallback-journal"
    shutil.copy2(src, old_partial)
    old_journal.write_bytes(b"FBJ1 journal of an older version")
    rc, res, err = srv.transfer(str(src), srv.url("/old/"), "--block-size", "256K")
    assert (rc, err) == (0, "") and (res["sent_bytes"], res["skipped_bytes"]) == (8 * BS, 0)
    assert sha256(folder / "big.bin") == sha256(src)
    assert old_partial.read_bytes() == src.read_bytes()
    assert old_journal.read_bytes() == b"FBJ1 journal of an older version"


# -- the state folder is not the user's -----------------------------------------------------------
def test_the_state_folder_is_never_listed_served_or_written(srv: Daemon, tmp_path: Path) -> None:
    docroot = srv.docroots["alice"]
    f = make_file(tmp_path / "f.bin", 3 * BS, seed=7)
    rc, res, _ = srv.transfer(str(f), srv.url("/sf/"), "--block-size", "256K")
    assert res["ok"]
    state = docroot / STATE_DIR
    assert is_state_dir(state) and (state / "README").read_bytes().startswith(MAGIC)
    (docroot / "sneaky").symlink_to(state)  # as an administrator might leave one
    try:
        assert STATE_DIR not in listing(srv, "/")
        assert listing(srv, "/sf/") == ["f.bin"]
        for path in ("/.fallback", "/.fallback/", "/.fallback/README", "/.fallback/parts",
                     "/.fallback/parts/nothing.partial", "/%2Efallback/README", "/sneaky/README",
                     "/sneaky/"):
            code, body = curl(srv, path)
            assert (code, json.loads(body)) == (403, RESERVED), path
        code, body = curl(srv, "-I", "/.fallback/README")
        assert code == 403
        for path in ("/.fallback/parts/x.partial", "/.fallback/README", "/sneaky/parts/y"):
            code, body = curl(srv, "-T", str(f), path)
            assert (code, json.loads(body)) == (403, RESERVED), path
        assert (state / "README").read_bytes().startswith(MAGIC)
        assert not (state / "parts" / "x.partial").exists() and not (state / "parts" / "y").exists()
        # sessions: an upload into it or named like it, a download of it or of something in it
        local = tmp_path / STATE_DIR
        make_file(local / "x.bin", 100, seed=8)
        for src, dst in ((str(f), srv.url("/.fallback/")), (str(f), srv.url("/.fallback/parts/p")),
                         (str(local), srv.url("/")), (str(f), srv.url("/sneaky/")),
                         (srv.url("/.fallback"), str(tmp_path / "dl") + "/"),
                         (srv.url("/.fallback/README"), str(tmp_path / "dl") + "/"),
                         (srv.url("/sneaky/README"), str(tmp_path / "dl") + "/")):
            rc, res, err = srv.transfer(src, dst, check=False)
            refused(rc, res, err, "that name is reserved")
        assert not (tmp_path / "dl").exists()
        # a raw session whose root is the docroot and whose entries reach into the state folder
        code, answer = control(srv, {"direction": "upload", "path": "/", "name": "", "entries": [
            {"path": "", "kind": "dir", "mtime_ns": 0, "mode": 0o755},
            {"path": ".fallback", "kind": "dir", "mtime_ns": 0, "mode": 0o755},
            {"path": ".fallback/README", "kind": "file", "size": 3, "mtime_ns": 0, "mode": 0o644,
             "block_size": BS}]})
        assert (code, answer) == (403, RESERVED)
        # a download of the whole docroot brings the user's files, nothing of ours
        out = tmp_path / "all"
        rc, res, err = srv.transfer(srv.url("/"), str(out) + "/")
        assert (rc, err) == (0, ""), res
        top = out / docroot.name
        assert (top / "sf" / "f.bin").exists()
        assert not (top / STATE_DIR).exists() and not (top / "sneaky").exists()
        assert not any(k.startswith(("sneaky", ".fallback")) for k in res["skipped_files"])
        assert (state / "README").read_bytes().startswith(MAGIC)  # and ours is intact
    finally:
        (docroot / "sneaky").unlink()
    assert "Traceback" not in srv.log()


def test_a_users_own_fallback_folder_deeper_is_an_ordinary_folder(srv: Daemon,
                                                                  tmp_path: Path) -> None:
    """Only the top of the docroot (and of a download destination) is reserved."""
    f = make_file(tmp_path / "mine.txt", 1234, seed=9)
    code, _ = curl(srv, "-T", str(f), "/u/.fallback/mine.txt")
    assert code == 201
    assert listing(srv, "/u/") == [STATE_DIR] and listing(srv, "/u/.fallback/") == ["mine.txt"]
    code, body = curl(srv, "/u/.fallback/mine.txt")
    assert code == 200 and body == f.read_bytes()
    out = tmp_path / "out"
    rc, res, err = srv.transfer(srv.url("/u"), str(out) + "/")
    assert (rc, err) == (0, "") and files(out / "u") == {".fallback/mine.txt": sha256(f)}
    # downloaded as the top of a destination it would be the client's state folder: refused
    rc, res, err = srv.transfer(srv.url("/u/.fallback"), str(out) + "/", check=False)
    refused(rc, res, err, "fallback's state folder")
    assert not (out / STATE_DIR).exists()
    rc, res, err = srv.transfer(srv.url("/u/.fallback"), str(out / "theirs"))
    assert (rc, err) == (0, "") and files(out / "theirs") == {"mine.txt": sha256(f)}


def test_a_users_fallback_folder_at_a_download_destination_is_left_alone(
        srv: Daemon, tmp_path: Path) -> None:
    """A ``.fallback`` of the user's (no marker) or a file of that name where the client would
    keep its state: the download is refused clearly, and the user's things are untouched."""
    f = make_file(srv.docroots["alice"] / "dest" / "f.bin", 3000, seed=18)
    out = tmp_path / "out"
    notes = make_file(out / STATE_DIR / "notes.txt", 100, seed=19)
    rc, res, err = srv.transfer(srv.url("/dest/f.bin"), str(out) + "/", check=False)
    refused(rc, res, err, "a folder of the user's is in the way of fallback's state folder")
    assert files(out) == {".fallback/notes.txt": sha256(notes)}
    shutil.rmtree(out / STATE_DIR)
    (out / STATE_DIR).write_text("a file\n")
    rc, res, err = srv.transfer(srv.url("/dest/f.bin"), str(out) + "/", check=False)
    refused(rc, res, err, "a file of that name is in the way of fallback's state folder")
    assert files(out) == {".fallback": sha256(out / STATE_DIR)}
    (out / STATE_DIR).unlink()
    rc, res, err = srv.transfer(srv.url("/dest/f.bin"), str(out) + "/")
    assert (rc, err) == (0, "") and files(out) == {"f.bin": sha256(f)}


def test_an_upload_leaves_out_the_clients_state_folders_only(srv: Daemon, tmp_path: Path) -> None:
    """A local folder that was a download destination holds a state folder (with partials of an
    interrupted download): uploading the folder sends the user's files, a user's own
    ``.fallback`` folders included, and never ours."""
    work = tmp_path / "work"
    a = make_file(work / "a.txt", 3000, seed=10)
    theirs = make_file(work / "deep" / ".fallback" / "notes.txt", 500, seed=11)
    readme = work / "deep2" / ".fallback" / "README"  # a user's README is not our marker
    readme.parent.mkdir(parents=True)
    readme.write_text("my own notes\n")
    src = make_file(tmp_path / "s.bin", 4 * BS, seed=12)
    entry = entry_for(src, "", BS)
    for top in (work, work / "deep3"):  # interrupted downloads into work/ and work/deep3/
        source = FileSource(src, entry)
        rec = FileReceiver(top / "s.bin", entry)
        rec.write_block(0, *source.read_block(0))
        rec.close()
        source.close()
        assert is_state_dir(top / STATE_DIR) and len(parts(top)) == 2
    rc, res, err = srv.transfer(str(work), srv.url("/"))
    assert (rc, err) == (0, ""), res
    assert files(srv.docroots["alice"] / "work") == {
        "a.txt": sha256(a), "deep/.fallback/notes.txt": sha256(theirs),
        "deep2/.fallback/README": sha256(readme)}
    assert res["files"] == 3
    # a state folder, or anything in it, is not a source at all
    for path in (work / STATE_DIR, work / STATE_DIR / "parts" / parts(work)[0]):
        rc, res, err = srv.transfer(str(path), srv.url("/nope/"), check=False)
        refused(rc, res, err, "fallback's own state folder, not a source")
    assert not (srv.docroots["alice"] / "nope").exists()


# -- resume and locks, with the state folder --------------------------------------------------------
def test_killed_upload_resumes_from_the_docroots_state_folder(srv: Daemon, tmp_path: Path) -> None:
    docroot = srv.docroots["alice"]
    big = make_file(tmp_path / "proj" / "sub" / "big.bin", SIZE, seed=13)
    target = docroot / "k9" / "proj" / "sub" / "big.bin"
    partial, journal = ours(target, docroot)
    proc = start_transfer(srv, str(tmp_path / "proj"), srv.url("/k9/"), "--block-size", "256K",
                          "--streams", "1")
    wait_until(lambda: partial.exists() and partial.stat().st_size >= AT, "the upload's partial")
    proc.send_signal(signal.SIGSTOP)
    have = wait_journal_stable(target, root=docroot)
    kill(proc)
    assert 4 <= len(have) < SIZE // BS
    assert not target.exists() and journal.exists()
    assert hidden_beside(target.parent) == [] and sorted(os.listdir(target.parent)) == []
    rc, res, err = srv.transfer(str(tmp_path / "proj"), srv.url("/k9/"), "--block-size", "256K")
    assert (rc, err) == (0, ""), res
    assert res["skipped_bytes"] >= len(have) * BS and res["sent_bytes"] + res["skipped_bytes"] == SIZE
    assert sha256(target) == sha256(big)
    assert not partial.exists() and not journal.exists()
    assert sorted(os.listdir(target.parent)) == ["big.bin"]


def test_killed_download_resumes_from_the_destinations_state_folder(srv: Daemon,
                                                                    tmp_path: Path) -> None:
    served = make_file(srv.docroots["alice"] / "k9d" / "proj" / "big.bin", SIZE, seed=14)
    out = tmp_path / "out"
    target = out / "proj" / "big.bin"
    partial, journal = ours(target, out)
    url = srv.url("/k9d/proj")
    proc = start_transfer(srv, url, str(out) + "/", "--streams", "1")
    assert srv.proc is not None
    try:
        wait_until(lambda: partial.exists() and partial.stat().st_size >= AT,
                   "the download's partial")
        srv.proc.send_signal(signal.SIGSTOP)  # freeze the sender; the client journals what it got
        try:
            have = wait_journal_stable(target, root=out)
        finally:
            kill(proc)
    finally:
        srv.proc.send_signal(signal.SIGCONT)
    assert 4 <= len(have) < SIZE // BS and not target.exists()
    assert sorted(os.listdir(out)) == [STATE_DIR, "proj"] and is_state_dir(out / STATE_DIR)
    assert sorted(os.listdir(out / "proj")) == [] and journal.exists()
    rc, res, err = srv.transfer(url, str(out) + "/", "--streams", "4")
    assert (rc, err) == (0, ""), res
    assert res["skipped_bytes"] >= len(have) * BS and res["sent_bytes"] + res["skipped_bytes"] == SIZE
    assert sha256(target) == sha256(served)
    assert sorted(os.listdir(out)) == ["proj"]  # the state folder went with its last partial


def test_two_writers_to_one_target_still_conflict(srv: Daemon, tmp_path: Path) -> None:
    """The lock is the journal's flock in the state folder: a plain PUT meets a session's
    upload, and a second download meets the first, on either side."""
    docroot = srv.docroots["alice"]
    big = make_file(tmp_path / "w.bin", SIZE, seed=15)
    target = docroot / "two" / "w.bin"
    partial, journal = ours(target, docroot)
    a = start_transfer(srv, str(big), srv.url("/two/"), "--block-size", "256K", "--streams", "1")
    try:
        wait_until(lambda: partial.exists() and partial.stat().st_size >= AT, "A's partial")
        a.send_signal(signal.SIGSTOP)  # A holds the target mid-transfer
        other = make_file(tmp_path / "other.bin", 1000, seed=16)
        code, body = curl(srv, "-T", str(other), "/two/w.bin")
        assert (code, json.loads(body)) == (409, {"error": f"w.bin: {BUSY}"})
        assert not target.exists() and journal.exists()
    finally:
        kill(a)
    # downloads: the second one into the same local target fails clearly, the first resumes
    out = tmp_path / "dl"
    local = out / "w.bin"
    lpartial, ljournal = ours(local, out)
    shutil.copy2(big, docroot / "w.bin")
    first = start_transfer(srv, srv.url("/w.bin"), str(out) + "/", "--streams", "1")
    try:
        wait_until(lambda: lpartial.exists() and lpartial.stat().st_size >= AT, "the partial")
        first.send_signal(signal.SIGSTOP)
        rc, res, err = srv.transfer(srv.url("/w.bin"), str(out) + "/", check=False)
        refused(rc, res, err, BUSY)
        assert res["error"] == f"w.bin: {BUSY}" and ljournal.exists() and not local.exists()
    finally:
        first.send_signal(signal.SIGCONT)
    out_, err_ = first.communicate(timeout=120)
    assert first.returncode == 0, err_
    assert sha256(local) == sha256(big) and sorted(os.listdir(out)) == ["w.bin"]


def test_a_client_tidying_its_state_folder_never_breaks_a_receiver(tmp_path: Path) -> None:
    """Downloads into one folder at once: one tidies the (empty) state folder while others
    create it and open journals in it. Every receiver commits, and at the end nothing of
    ours is left."""
    src = make_file(tmp_path / "s.bin", 2 * BS, seed=20)
    entry = entry_for(src, "", BS)
    out = tmp_path / "out"
    state = StateDir(out)
    deadline = time.monotonic() + 0.8
    errors: list[BaseException] = []
    done = [0]

    def receive(n: int) -> None:
        source = FileSource(src, entry)
        try:
            while time.monotonic() < deadline:
                rec = FileReceiver(out / f"t{n}.bin", entry, fsync=False)
                for b in range(2):
                    rec.write_block(b, *source.read_block(b))
                rec.commit(digest_path(src, BS))
                done[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            source.close()

    def tidy() -> None:
        while time.monotonic() < deadline:
            try:
                state.tidy()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=tidy))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and done[0] > 10, (errors, done)
    assert state.tidy() and sorted(os.listdir(out)) == ["t0.bin", "t1.bin", "t2.bin"]
    assert all(sha256(out / f"t{n}.bin") == sha256(src) for n in range(3))


# -- commit across file systems -------------------------------------------------------------------
def _other_fs(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    return shm


def test_publish_across_file_systems_copies_beside_the_target(tmp_path: Path) -> None:
    shm = _other_fs(tmp_path)
    where = shm / f"fallback-test-{os.getpid()}"
    where.mkdir()
    try:
        partial = where / "x.partial"
        partial.write_bytes(b"new contents" * 1000)
        os.chmod(partial, 0o640)
        os.utime(partial, ns=(1_600_000_000_000_000_000,) * 2)
        target = tmp_path / "t" / "x.bin"
        target.parent.mkdir()
        target.write_bytes(b"old")
        state = StateDir(tmp_path / "t")
        with pytest.raises(ConflictError, match="x.bin: exists and overwrite is not allowed"):
            state.publish(partial, target, replace=False)
        assert target.read_bytes() == b"old" and partial.exists()
        assert sorted(os.listdir(target.parent)) == ["x.bin"]  # its temporary copy is gone
        state.publish(partial, target, replace=True)
        assert target.read_bytes() == b"new contents" * 1000 and not partial.exists()
        assert target.stat().st_mtime_ns == 1_600_000_000_000_000_000
        assert target.stat().st_mode & 0o777 == 0o640
        assert sorted(os.listdir(target.parent)) == ["x.bin"]
    finally:
        shutil.rmtree(where)


def test_daemon_whose_state_folder_is_on_another_file_system(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Commits fall back from ``rename`` (EXDEV) to a synced copy beside the target, for
    session uploads and plain PUT alike, and leave nothing behind on either side."""
    shm = _other_fs(tmp_path)
    where = shm / f"fallback-state-{os.getpid()}"
    where.mkdir()
    try:
        d = daemon_factory(start=False)
        docroot = d.docroots["alice"]
        docroot.mkdir(parents=True)
        (docroot / STATE_DIR).symlink_to(where)
        d.start()
        src = make_file(tmp_path / "x" / "f.bin", 3 * (4 << 20) + 5, seed=17)
        rc, res, err = d.transfer(str(tmp_path / "x"), d.url("/"))
        assert (rc, err) == (0, ""), res
        assert sha256(docroot / "x" / "f.bin") == sha256(src)
        assert (docroot / "x" / "f.bin").stat().st_mtime_ns == src.stat().st_mtime_ns
        code, _ = curl(d, "-T", str(src), "/x/put.bin")
        assert code == 201 and sha256(docroot / "x" / "put.bin") == sha256(src)
        assert sorted(os.listdir(docroot / "x")) == ["f.bin", "put.bin"]
        assert sorted(os.listdir(where)) == ["README", "parts"] and os.listdir(where / "parts") == []
        assert listing(d, "/") == ["x"]
        assert "Traceback" not in d.log()
    finally:
        shutil.rmtree(where)

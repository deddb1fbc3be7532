"""Integrity of resumed transfers (issue #10), against real daemons.

``ok: true`` with a checksum must mean the bytes at the destination equal the
source's, read back and checked; a resume mode that trades part of that away
says so in the result (``verified``). Each test starts from a transfer
interrupted once per module (the receiver's partial and journal snapshotted,
then put back for every test), as in ``test_resume``:

* a byte flipped in a journaled block of the partial, on either side: the
  receiver re-reads carried-over blocks before commit, drops the bad one and
  has it sent again, whatever the resume mode;
* a source edited in a block the ``sparse`` sample does not cover, its mtime
  set back: an upload says ``verified: "sampled"``; a download compares every
  kept block with the daemon's current bytes and fetches the changed one;
* a source edited while a download runs: the whole-file check against the
  daemon fails that file, nothing is published;
* ``partial_file_suffix`` values that would make a partial take the name of a
  journal or an encrypted file are refused by ``fallback config validate``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PASSWORDS, Daemon, make_file, sha256
from tests.interrupt import journaled, wait_journal_stable
from tests.test_resume import (
    BS,
    NO_FSYNC_XML,
    SIZE,
    UP,
    interrupted_upload,
    kill,
    leftovers,
    module_daemon,
    snapshot,
    start_transfer,
    wait_progress,
)
from transport.blocks import envelope as env
from transport.blocks.digest import digest_path
from transport.blocks.plan import resume_samples
from transport.blocks.receiver import FileReceiver, partial_path
from transport.blocks.source import FileSource, entry_for
from transport.errors import IntegrityError

MODES = ["attrs", "sparse", "full"]
PASS = "Corr3ct-Horse-Battery-Staple"
AT = 10 << 20  # interrupt once this much arrived: 40 blocks, well past the 16 sparse samples


def flip(path: Path, offset: int) -> None:
    """Invert one byte in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def edit_keeping_mtime(path: Path, offset: int) -> None:
    """Change bytes in place and set the mtime back: size and mtime say 'unchanged'."""
    mtime = path.stat().st_mtime_ns
    flip(path, offset)
    os.utime(path, ns=(mtime, mtime))


def unsampled(have: dict[int, bytes]) -> int:
    """A journaled block that the sparse resume check does not compare."""
    samples = resume_samples(have, "sparse")
    assert len(samples) == 16 < len(have)
    return next(b for b in sorted(have) if b not in samples)


@dataclass
class Interrupted:
    """A transfer interrupted once (module-wide); ``restore`` puts its partial back as left."""

    daemon: Daemon
    pristine: Path  # the source as it was
    target: Path  # where the receiver's partial is (beside this name)
    restore: Callable[[], None]

    def held(self) -> dict[int, bytes]:
        """Journaled blocks of the restored partial."""
        return journaled(self.target)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(tmp_path_factory, NO_FSYNC_XML)


@pytest.fixture(scope="module")
def up(shared: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    pristine = make_file(tmp_path_factory.mktemp("pristine") / "big.bin", SIZE, seed=21)
    target, have = interrupted_upload(shared, pristine, at=AT)
    assert len(have) > 16
    return Interrupted(shared, pristine, target, snapshot(target, tmp_path_factory.mktemp("snap")))


def interrupt_download(d: Daemon, url: str, target: Path, *opts: str,
                       env_extra: dict[str, str] | None = None) -> dict[int, bytes]:
    """Download ``url`` into ``target``, freeze the daemon once AT bytes arrived, kill the client."""
    if env_extra:
        e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"], **env_extra}
        proc = subprocess.Popen(d.cli_args("transfer", url, str(target), "--json", "-q",
                                           "--streams", "1", *opts),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    else:
        proc = start_transfer(d, url, str(target), "--streams", "1", *opts)
    assert d.proc is not None
    try:
        wait_progress(proc, target, AT)
        d.proc.send_signal(signal.SIGSTOP)  # freeze the sender; the client journals what it got
        try:
            have = wait_journal_stable(target)
        finally:
            kill(proc)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert 16 < len(have) < SIZE // BS and not target.exists()
    return have


@pytest.fixture(scope="module")
def down(shared: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    pristine = make_file(tmp_path_factory.mktemp("pristine") / "dl.bin", SIZE, seed=22)
    shutil.copy2(pristine, shared.docroots["alice"] / "dl.bin")
    target = tmp_path_factory.mktemp("client") / "dl.bin"
    interrupt_download(shared, shared.url("/dl.bin"), target)
    return Interrupted(shared, pristine, target, snapshot(target, tmp_path_factory.mktemp("snap")))


# -- 1. a corrupted partial is sent again, never published -------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_corrupted_daemon_partial_is_sent_again_on_upload(up: Interrupted, tmp_path: Path,
                                                          mode: str) -> None:
    up.restore()
    held = up.held()
    bad = sorted(held)[len(held) // 2]
    flip(partial_path(up.target), bad * BS + 1234)
    src = tmp_path / "big.bin"
    shutil.copy2(up.pristine, src)  # same size and mtime: the partial's identity
    rc, res, err = up.daemon.transfer(str(src), up.daemon.url("/big.bin"), *UP, "--resume", mode)
    assert rc == 0 and err == "" and res["ok"] is True
    assert sha256(up.target) == sha256(src)
    assert res["checksums"] == {"big.bin": digest_path(src, BS)}
    # everything kept was reused except the damaged block, which was sent again
    assert res["skipped_bytes"] == (len(held) - 1) * BS
    assert res["sent_bytes"] == SIZE - res["skipped_bytes"]
    assert leftovers(up.target.parent) == []
    assert "failed re-verification" in up.daemon.log()


@pytest.mark.parametrize("mode", MODES)
def test_corrupted_client_partial_is_fetched_again_on_download(down: Interrupted,
                                                               mode: str) -> None:
    down.restore()
    held = down.held()
    bad = sorted(held)[len(held) // 3]
    flip(partial_path(down.target), bad * BS + 77)
    rc, res, err = down.daemon.transfer(down.daemon.url("/dl.bin"), str(down.target),
                                        "--resume", mode)
    assert rc == 0 and err == "" and res["ok"] is True
    assert sha256(down.target) == sha256(down.pristine)
    assert res["verified"] == "full"
    assert res["checksums"] == {"dl.bin": digest_path(down.pristine, BS)}
    assert res["skipped_bytes"] == (len(held) - 1) * BS
    assert res["sent_bytes"] == SIZE - res["skipped_bytes"]
    assert leftovers(down.target.parent) == []


@pytest.fixture(scope="module")
def down_decrypting(shared: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """A decrypting download interrupted: the client's partial holds plaintext, its journal
    the digests of the ciphertext blocks that arrived."""
    pristine = make_file(tmp_path_factory.mktemp("pristine") / "secret.bin", SIZE, seed=23)
    env.encrypt_file(pristine, shared.docroots["alice"] / ("secret.bin" + env.SUFFIX), PASS, BS)
    target = tmp_path_factory.mktemp("client") / "secret.bin"
    interrupt_download(shared, shared.url(f"/secret.bin{env.SUFFIX}"), target, "--decrypt",
                       env_extra={"FALLBACK_FILEPASS": PASS})
    return Interrupted(shared, pristine, target, snapshot(target, tmp_path_factory.mktemp("snap")))


@pytest.mark.parametrize("mode", ["attrs", "full"])
def test_corrupted_plaintext_partial_is_fetched_again_on_decrypting_download(
        down_decrypting: Interrupted, mode: str) -> None:
    """Re-hashing a decoded partial: the plaintext is re-encrypted (deterministic per block)
    and compared with the journaled ciphertext digest."""
    dd = down_decrypting
    dd.restore()
    held = dd.held()
    bad = sorted(held)[len(held) // 2]
    flip(partial_path(dd.target), bad * BS + 5)
    rc, res, err = dd.daemon.transfer(dd.daemon.url(f"/secret.bin{env.SUFFIX}"), str(dd.target),
                                      "--decrypt", "--resume", mode,
                                      env={"FALLBACK_FILEPASS": PASS})
    assert rc == 0 and res["ok"] is True and res["content"] == {"secret.bin": "decrypted"}
    assert sha256(dd.target) == sha256(dd.pristine)
    assert res["checksums"] == {"secret.bin": digest_path(dd.pristine, BS)}
    assert res["skipped_bytes"] == (len(held) - 1) * BS
    assert leftovers(dd.target.parent) == []


def test_damaged_blocks_leave_the_journal_on_disk(tmp_path: Path) -> None:
    """A partial cut short and one byte flipped: the receiver drops exactly those blocks,
    from the journal file too (a crash right after must not bring them back), refuses to
    publish until they are received again, then publishes the right bytes."""
    src = make_file(tmp_path / "f.bin", 8 * BS, seed=25)
    entry = entry_for(src, "", BS)
    target = tmp_path / "out" / "f.bin"
    target.parent.mkdir()
    source = FileSource(src, entry)
    rec = FileReceiver(target, entry)
    for b in range(8):
        rec.write_block(b, *source.read_block(b))
    rec.close()
    flip(partial_path(target), 2 * BS + 9)
    os.truncate(partial_path(target), 6 * BS + 100)  # blocks 6 and 7 gone or cut short
    rec = FileReceiver(target, entry, resume=True)
    assert rec.unverified == 8 and not rec.missing()
    with pytest.raises(IntegrityError, match="3 blocks kept from an earlier run no longer match"):
        rec.commit(digest_path(src, BS))
    assert sorted(journaled(target)) == [0, 1, 3, 4, 5] and list(rec.missing().members()) == [2, 6, 7]
    assert not target.exists() and rec.unverified == 0
    for b in list(rec.missing().members()):
        rec.write_block(b, *source.read_block(b))
    rec.commit(digest_path(src, BS))
    source.close()
    assert sha256(target) == sha256(src)
    assert leftovers(target.parent) == []


# -- 2. a stale partial: the source edited with its mtime set back -----------------------------------
def stale_upload_source(up: Interrupted, tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    up.restore()
    held = up.held()
    src = tmp_path / "big.bin"
    shutil.copy2(up.pristine, src)
    edit_keeping_mtime(src, unsampled(held) * BS + 300)
    return src, held


@pytest.mark.parametrize("mode", ["attrs", "sparse"])
def test_stale_upload_resumed_by_sampling_says_sampled(up: Interrupted, tmp_path: Path,
                                                       mode: str) -> None:
    src, held = stale_upload_source(up, tmp_path)
    rc, res, err = up.daemon.transfer(str(src), up.daemon.url("/big.bin"), *UP, "--resume", mode)
    assert rc == 0 and res["ok"] is True
    assert res["skipped_bytes"] == len(held) * BS  # kept blocks were trusted...
    assert res["verified"] == "sampled"  # ...and the result says so
    assert res["verified_files"] == {"big.bin": "sampled"}
    # the checksum describes what was stored, which is not the edited source
    assert res["checksums"] == {"big.bin": digest_path(up.target, BS)}
    assert sha256(up.target) != sha256(src)


def test_stale_upload_summary_says_sampled_in_words(up: Interrupted, tmp_path: Path) -> None:
    src, _ = stale_upload_source(up, tmp_path)
    e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    p = subprocess.run(up.daemon.cli_args("transfer", str(src), up.daemon.url("/big.bin"), *UP,
                                          "--resume", "sparse"),
                       capture_output=True, text=True, timeout=300, env=e)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("upload ok: 1 file,")
    assert lines[1].startswith("verification sampled for 1 file:"), p.stdout
    assert "--resume full" in lines[1]


def test_stale_upload_resumed_in_full_is_right_and_says_full(up: Interrupted,
                                                              tmp_path: Path) -> None:
    src, _ = stale_upload_source(up, tmp_path)
    rc, res, err = up.daemon.transfer(str(src), up.daemon.url("/big.bin"), *UP, "--resume", "full")
    assert rc == 0 and res["ok"] is True
    assert sha256(up.target) == sha256(src)
    assert (res["verified"], res["verified_files"]) == ("full", {})
    assert res["checksums"] == {"big.bin": digest_path(src, BS)}


def test_default_resume_verifies_in_full(up: Interrupted, tmp_path: Path) -> None:
    """Without --resume: the default compares every kept block with the source."""
    src, _ = stale_upload_source(up, tmp_path)
    rc, res, err = up.daemon.transfer(str(src), up.daemon.url("/big.bin"), *UP)
    assert rc == 0 and res["ok"] is True
    assert sha256(up.target) == sha256(src)
    assert res["verified"] == "full"


@pytest.mark.parametrize("mode", MODES)
def test_stale_download_partial_gets_the_changed_block(down: Interrupted, mode: str) -> None:
    """The daemon's file edited in a block the sparse sample does not cover, mtime set back."""
    d = down.daemon
    served = d.docroots["alice"] / f"stale-{mode}.bin"
    shutil.copy2(down.pristine, served)  # same size and mtime as the partial's source
    down.restore()
    held = down.held()
    edit_keeping_mtime(served, unsampled(held) * BS + 4000)
    rc, res, err = d.transfer(d.url(f"/stale-{mode}.bin"), str(down.target), "--resume", mode)
    assert rc == 0 and res["ok"] is True
    assert sha256(down.target) == sha256(served)
    assert res["checksums"] == {f"stale-{mode}.bin": digest_path(served, BS)}
    assert (res["verified"], res["verified_files"]) == ("full", {})
    if mode != "full":  # only the changed block was fetched again (full starts over)
        assert res["skipped_bytes"] == (len(held) - 1) * BS
    assert leftovers(down.target.parent) == []


# -- 3. the whole-file digest is compared with the daemon's before publishing ------------------------
def test_source_edited_during_a_download_is_not_published(shared: Daemon, tmp_path: Path) -> None:
    """Bytes already sent change on the daemon (mtime set back): every block arrived intact,
    but the file no longer equals the source, so the client must not publish it."""
    served = make_file(shared.docroots["alice"] / "moving.bin", SIZE, seed=24)
    target = tmp_path / "moving.bin"
    proc = start_transfer(shared, shared.url("/moving.bin"), str(target), "--streams", "1")
    assert shared.proc is not None
    try:
        wait_progress(proc, target, 4 << 20)
        shared.proc.send_signal(signal.SIGSTOP)
        edit_keeping_mtime(served, 10)  # block 0: already sent
    finally:
        shared.proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err and err.startswith("error: ") and len(err.splitlines()) == 1
    # Whichever check sees it first says so: the daemon's source check after a read
    # ("changed on the server during the transfer") or the client's whole-file comparison.
    assert ("moving.bin: changed on the server during the transfer" in err
            or "moving.bin: modified during the transfer" in err and "not published" in err)
    assert not target.exists()
    assert '"ok": false' in out


# -- 4. partial_file_suffix values that collide with the daemon's other names ------------------------
CONF = """\
<?xml version="1.0"?>
<CONF version="2">
  <file_system>
    <partial_file_suffix>{suffix}</partial_file_suffix>
  </file_system>
  <users><user><name>alice</name>
    <password_hash>$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA</password_hash>
    <docroot>{docroot}</docroot></user></users>
</CONF>
"""


def validate(tmp_path: Path, suffix: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "aspera.conf"
    path.write_text(textwrap.dedent(CONF).format(suffix=suffix, docroot=tmp_path))
    return subprocess.run([sys.executable, "-m", "fallback", "config", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("suffix", "what"), [
    (".fallback-journal", "journal"),  # the partial of T would be T's own journal
    ("journal", "journal"),  # the partial of "x.fallback-" would be the journal of "x"
    ("-journal", "journal"),
    ("x.fallback-journal", "journal"),  # the partial of T is the journal of "T.x"
    (".fallback-env", "envelope"),  # the partial of "x" is where an encrypted ".x" is stored
    ("env", "envelope"),
])
def test_config_refuses_suffixes_that_collide(tmp_path: Path, suffix: str, what: str) -> None:
    p = validate(tmp_path, suffix)
    assert p.returncode == 2 and p.stdout == ""
    path = tmp_path / "aspera.conf"
    assert p.stderr.strip().splitlines() == [
        f'{path}:4: partial_file_suffix: "{suffix}" collides with the {what} suffix '
        f'"{".fallback-journal" if what == "journal" else ".fallback-env"}" '
        f"(a partial file could take the name of {'a journal' if what == 'journal' else 'an encrypted file'}); "
        "choose another, e.g. the default .fallback-partial"]


@pytest.mark.parametrize(("suffix", "message"), [
    ("", "partial_file_suffix: value is empty"),
    ("a/b", 'partial_file_suffix: "a/b" must not contain a path separator'),
])
def test_config_refuses_empty_or_path_suffixes(tmp_path: Path, suffix: str, message: str) -> None:
    p = validate(tmp_path, suffix)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"{tmp_path / 'aspera.conf'}:4: {message}"]


@pytest.mark.parametrize("suffix", [".part", ".fallback-partial", "~journal.tmp"])
def test_config_accepts_suffixes_that_do_not_collide(tmp_path: Path, suffix: str) -> None:
    p = validate(tmp_path, suffix)
    assert p.returncode == 0, p.stderr
    assert suffix in p.stdout

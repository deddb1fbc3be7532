"""Encryption at rest through real daemons (issue #6), over HTTP and HTTPS.

Every test runs the real CLI against a real daemon subprocess (or, for
``fallback encrypt``/``decrypt``, with no daemon at all) and checks what ends up
on disk at both ends. One daemon is shared by the module (it serves both
schemes); tests that need a content-protection policy start their own.
Downloads are served in 256 KiB blocks and uploads use ``--block-size 256K``,
so files of a megabyte or two have many blocks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from tests.interrupt import journaled, wait_journal_stable, wait_until
from tests.statefiles import hidden_beside, ours, parts
from transport.blocks import envelope as env
from transport.blocks.digest import digest_path
from transport.blocks.receiver import partial_path
from transport.blocks.statedir import StateDir

BS = 256 << 10
BSARG = ("--block-size", "256K")
BLOCK_XML = "<file_system><block_size>256K</block_size></file_system>"
PASS = "Corr3ct-Horse-Battery-Staple"  # strong: 28 characters, 4 classes
WRONG = "Corr3ct-Horse-Battery-Stapler"
SUFFIX = env.SUFFIX
HS = env.HEADER_SIZE  # version 1: what ``env.encrypt_file`` (``fallback encrypt``) writes
HS2 = env.HEADER_SIZES[2]  # version 2: what the engine's uploads write (one keyring a transfer)
REQUIRED_XML = ("<transfer><encryption><content_protection_required>true"
                "</content_protection_required></encryption></transfer>")
STRONG_XML = ("<transfer><encryption><content_protection_strong_pass_required>true"
              "</content_protection_strong_pass_required></encryption></transfer>")

# A 64-byte period that divides the block size: the plaintext holds only 64
# distinct 32-byte windows (all checked), and its blocks are all identical.
UNIT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
SCHEMES = pytest.mark.parametrize("scheme", ["http", "https"])


# -- helpers -------------------------------------------------------------------------------------------
def patterned(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((UNIT * (size // len(UNIT) + 1))[:size])
    return path


def xfer(d: Daemon, src: str, dst: str, scheme: str, *opts: str, pw: str | None = PASS,
         check: bool = True) -> tuple[int, dict[str, Any], str]:
    """``fallback transfer --json --transport SCHEME`` with FALLBACK_FILEPASS set to ``pw``."""
    e = {"FALLBACK_FILEPASS": pw} if pw is not None else {}
    return d.transfer(src, dst, "--transport", scheme, *opts, env=e, check=check)


def cli(*args: str, pw: str = PASS) -> subprocess.CompletedProcess[str]:
    """``fallback ARGS`` without any daemon."""
    e = {**os.environ, "FALLBACK_FILEPASS": pw}
    return subprocess.run([sys.executable, "-m", "fallback", *args], capture_output=True,
                          text=True, timeout=120, env=e)


def cli_checksum(path: Path) -> str:
    p = cli("checksum", str(path), *BSARG)
    assert p.returncode == 0, p.stderr
    digest, name = p.stdout.strip().split("  ", 1)
    assert name == str(path)
    return digest


def files_under(root: Path) -> dict[str, int]:
    """Every file below ``root`` (hidden ones included) -> size; folders are not listed."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(root: Path) -> list[str]:
    """Partial files and journals (names starting with '.') anywhere below ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*"))


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    """Flip one bit of a file in place, keeping its size and mtime (as silent corruption would)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def stored_size(plain: int, header: int = HS2) -> int:
    """Size of an envelope of ``plain`` bytes (by default one the engine uploaded)."""
    return header + plain + -(-plain // BS) * env.OVERHEAD


def stored_blocks(data: bytes, plain: int, header: int = HS2) -> list[bytes]:
    out = []
    for i in range(-(-plain // BS)):
        start = header + i * (BS + env.OVERHEAD)
        out.append(data[start:start + min(BS, plain - i * BS) + env.OVERHEAD])
    return out








def start(d: Daemon, src: str, dst: str, scheme: str, *opts: str) -> subprocess.Popen[str]:
    e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"], "FALLBACK_FILEPASS": PASS}
    return subprocess.Popen(d.cli_args("transfer", src, dst, "--json", "-q", "--transport", scheme,
                                       *opts),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def wait_partial(proc: subprocess.Popen[str], target: Path, nbytes: int,
                 root: Path | None = None) -> None:
    """Until the receiver's partial of ``target`` (in the state folder of ``root``, the tree's
    top, default ``target``'s folder) reaches ``nbytes``; fail if the run ended."""
    part = partial_path(target, StateDir(root or target.parent))

    def moved() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"transfer ended (rc={proc.returncode}) before it could be "
                                 f"interrupted: {out} {err}")
        try:
            return part.stat().st_size >= nbytes
        except FileNotFoundError:
            return False

    wait_until(moved, f"{nbytes} bytes in {part}")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module (HTTP and HTTPS ports), serving 256 KiB blocks."""
    base = tmp_path_factory.mktemp("encd")
    d = Daemon(base, free_port(), free_port(), {"alice": base / "docroot" / "alice"}, BLOCK_XML)
    d.start()
    yield d
    d.stop(signal.SIGKILL)
    assert PASS not in d.log() and WRONG not in d.log()


# -- 1. encrypted upload, decrypted download ------------------------------------------------------------
@SCHEMES
def test_encrypted_upload_then_decrypted_download(shared: Daemon, tmp_path: Path,
                                                  scheme: str) -> None:
    size = 5 * BS + 12345  # six blocks, the first five identical in plaintext
    src = patterned(tmp_path / "src" / "pat.bin", size)
    folder = shared.docroots["alice"] / f"t1-{scheme}"

    rc, res, err = xfer(shared, str(src), shared.url(f"/t1-{scheme}/", scheme=scheme), scheme,
                        *BSARG, "--encrypt")
    assert rc == 0 and res["ok"] and res["error"] is None and res["transports"] == [scheme]
    assert res["direction"] == "upload" and res["files"] == 1 and res["bytes"] == size
    assert res["sent_bytes"] + res["skipped_bytes"] == size
    assert res["content"] == {"pat.bin": "envelope"}
    expected = cli_checksum(src)
    assert res["checksums"] == {"pat.bin": expected}  # of the plaintext, not of the envelope

    # stored as NAME.fallback-env, nothing else (no partial, no journal)
    assert files_under(folder) == {"pat.bin" + SUFFIX: stored_size(size)}
    stored = (folder / ("pat.bin" + SUFFIX)).read_bytes()
    assert stored.startswith(b"FBENV\x02")  # version 2: one Argon2id per transfer
    header = env.EnvelopeHeader.decode(stored)
    assert (header.block_size, header.plain_size) == (BS, size)
    # no 32-byte run of the plaintext anywhere in the stored bytes: with a 64-byte period the
    # plaintext has exactly 64 distinct 32-byte windows, so this covers all of them
    plain = src.read_bytes()
    windows = {plain[k:k + 32] for k in range(len(UNIT))}
    assert len(windows) == len(UNIT)
    assert [w for w in windows if w in stored] == []
    assert UNIT not in stored
    # identical plaintext blocks give different stored blocks (the index is in the nonce)
    blocks = stored_blocks(stored, size)
    assert len(set(blocks[:5])) == 5
    assert PASS.encode() not in stored

    # the daemon never saw the passphrase; the client does not print it either
    assert PASS not in shared.log() and PASS not in err and PASS not in str(res)

    out = tmp_path / "out"
    out.mkdir()
    rc, res, err = xfer(shared, shared.url(f"/t1-{scheme}/pat.bin{SUFFIX}", scheme=scheme),
                        str(out) + "/", scheme, "--decrypt")
    assert rc == 0 and res["ok"] and res["transports"] == [scheme] and res["direction"] == "download"
    assert res["content"] == {"pat.bin": "decrypted"}
    assert res["checksums"] == {"pat.bin": expected}
    assert res["bytes"] == size == res["sent_bytes"] + res["skipped_bytes"]
    assert files_under(out) == {"pat.bin": size}  # plaintext name; no partial, journal or envelope
    assert sha256(out / "pat.bin") == sha256(src)
    assert PASS not in shared.log() and PASS not in err


# -- 2. server policies -------------------------------------------------------------------------------
def policy_daemon(tmp_path_factory: pytest.TempPathFactory, xml: str) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("policy")
    d = Daemon(base, free_port(), free_port(), {"alice": base / "docroot" / "alice"}, xml)
    d.start()
    yield d
    d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from policy_daemon(tmp_path_factory, REQUIRED_XML)


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from policy_daemon(tmp_path_factory, STRONG_XML)


def everything(root: Path) -> list[str]:
    """Every file and folder below ``root``, hidden ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_content_protection_required_refuses_a_plain_put(required: Daemon) -> None:
    """Before: ``curl -T`` stored plaintext (201) on a daemon that requires content
    protection; now a 403 naming the way that works, and nothing is written."""
    import base64
    import http.client
    docroot = required.docroots["alice"]
    before = everything(docroot)
    c = http.client.HTTPConnection("127.0.0.1", required.http_port, timeout=30)
    auth = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    c.request("PUT", "/cp/plain.bin", body=b"plaintext" * 1000,
              headers={"Authorization": f"Basic {auth}"})
    r = c.getresponse()
    body = r.read().decode()
    assert r.status == 403 and "Server requires content protection" in body, (r.status, body)
    assert "fallback --encrypt" in body
    assert everything(docroot) == before


@SCHEMES
def test_content_protection_required(required: Daemon, tmp_path: Path, scheme: str) -> None:
    d = required
    docroot = d.docroots["alice"]
    tree = tmp_path / "tree"
    make_file(tree / "a.bin", 2 * BS, seed=2)
    make_file(tree / "sub" / "b.bin", BS + 1, seed=3)

    before = everything(docroot)
    rc, res, err = xfer(d, str(tree), d.url(f"/in-{scheme}/", scheme=scheme), scheme, *BSARG,
                        check=False)
    assert rc == 1 and res["ok"] is False
    assert res["error"] == "Server requires content protection"
    assert err.strip() == "error: Server requires content protection"
    assert res["sent_bytes"] == 0 and res["checksums"] == {}
    # nothing at all was written: no file, no folder, no partial, no journal
    assert everything(docroot) == before

    rc, res, _ = xfer(d, str(tree), d.url(f"/in-{scheme}/", scheme=scheme), scheme, *BSARG,
                      "--encrypt")
    assert res["ok"] and res["content"] == {"tree/a.bin": "envelope", "tree/sub/b.bin": "envelope"}
    assert res["checksums"] == {f"tree/{p}": digest_path(tree / p, BS) for p in ("a.bin", "sub/b.bin")}
    assert files_under(docroot / f"in-{scheme}") == {
        "tree/a.bin" + SUFFIX: stored_size(2 * BS),
        "tree/sub/b.bin" + SUFFIX: stored_size(BS + 1),
    }
    got = tmp_path / "b.bin"
    env.decrypt_file(docroot / f"in-{scheme}" / "tree" / "sub" / ("b.bin" + SUFFIX), got, PASS)
    assert sha256(got) == sha256(tree / "sub" / "b.bin")
    # one key derivation for the whole transfer: both envelopes carry the transfer's salt
    # (one Argon2id), each its own file salt (its own key)
    headers = [env.EnvelopeHeader.decode((docroot / f"in-{scheme}" / "tree" / p).read_bytes())
               for p in ("a.bin" + SUFFIX, "sub/b.bin" + SUFFIX)]
    assert [h.version for h in headers] == [2, 2]
    assert headers[0].salt == headers[1].salt and headers[0].file_salt != headers[1].file_salt


@SCHEMES
def test_strong_passphrase_required(strong: Daemon, tmp_path: Path, scheme: str) -> None:
    d = strong
    docroot = d.docroots["alice"]
    f = make_file(tmp_path / "src" / "one.bin", 4 * BS, seed=4)

    before = everything(docroot)
    rc, res, err = xfer(d, str(f), d.url(f"/in-{scheme}/", scheme=scheme), scheme, *BSARG,
                        "--encrypt", pw="abc", check=False)
    assert rc == 1 and res["ok"] is False
    assert res["error"].startswith("Server requires a strong passphrase for content protection")
    assert "at least 12 characters" in res["error"]
    assert err.strip() == f"error: {res['error']}"
    assert res["sent_bytes"] == 0 and everything(docroot) == before  # before any data moved

    rc, res, _ = xfer(d, str(f), d.url(f"/in-{scheme}/", scheme=scheme), scheme, *BSARG,
                      "--encrypt")
    assert res["ok"] and res["content"] == {"one.bin": "envelope"}
    assert files_under(docroot / f"in-{scheme}") == {"one.bin" + SUFFIX: stored_size(4 * BS)}
    assert "abc" not in d.log() and PASS not in d.log()


# -- 3. mixed trees: envelopes and plain files --------------------------------------------------------
@SCHEMES
def test_mixed_envelopes_and_plain_files(shared: Daemon, tmp_path: Path, scheme: str) -> None:
    top = f"mix-{scheme}"
    served = shared.docroots["alice"] / top
    local = tmp_path / "local"
    # plain files, including one that merely starts with the envelope magic, a tiny and an empty one
    make_file(local / "a.txt", 3 * BS + 5, seed=10)
    (local / "fake.txt").write_bytes(b"FBENV\x01" + os.urandom(500))
    make_file(local / "plain" / "p1.bin", 2 * BS, seed=11)
    make_file(local / "plain" / "tiny.txt", 17, seed=12)
    make_file(local / "plain" / "empty", 0)
    # envelopes, at the top and in a folder of their own (one of an empty file)
    make_file(local / "b.bin", 4 * BS + 99, seed=13)
    make_file(local / "enc" / "c.dat", 3 * BS, seed=14)
    make_file(local / "enc" / "d.dat", BS - 1, seed=15)
    make_file(local / "enc" / "e.dat", 0)
    plain_files = ["a.txt", "fake.txt", "plain/p1.bin", "plain/tiny.txt", "plain/empty"]
    enveloped = ["b.bin", "enc/c.dat", "enc/d.dat", "enc/e.dat"]
    for p in plain_files:
        (served / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local / p, served / p)
    for p in enveloped:
        (served / p).parent.mkdir(parents=True, exist_ok=True)
        env.encrypt_file(local / p, served / (p + SUFFIX), PASS, BS)
    stored = files_under(served)
    assert len(stored) == 9

    # with --decrypt: envelopes decrypted (suffix dropped), plain files copied
    out = tmp_path / "dec"
    rc, res, _ = xfer(shared, shared.url(f"/{top}", scheme=scheme), str(out) + "/", scheme,
                      "--decrypt")
    assert res["ok"] and res["files"] == 9 and res["transports"] == [scheme]
    assert res["content"] == {**{f"{top}/{p}": "plain" for p in plain_files},
                              **{f"{top}/{p}": "decrypted" for p in enveloped}}
    assert res["checksums"] == {f"{top}/{p}": digest_path(local / p, BS)
                                for p in plain_files + enveloped}
    assert files_under(out / top) == {p: (local / p).stat().st_size
                                      for p in plain_files + enveloped}
    for p in plain_files + enveloped:
        assert sha256(out / top / p) == sha256(local / p), p

    # without --decrypt: envelopes arrive as they are stored, byte for byte
    out = tmp_path / "raw"
    rc, res, _ = xfer(shared, shared.url(f"/{top}", scheme=scheme), str(out) + "/", scheme)
    assert res["ok"] and res["files"] == 9
    assert res["content"] == {**{f"{top}/{p}": "plain" for p in plain_files},
                              **{f"{top}/{p}{SUFFIX}": "envelope" for p in enveloped}}
    assert set(res["checksums"]) == set(res["content"])
    assert files_under(out / top) == stored
    for p in stored:
        assert sha256(out / top / p) == sha256(served / p), p

    # a folder holding only envelopes, and one holding only plain files
    for folder, decrypt, expected in (
        ("enc", True, {f"enc/{p}": "decrypted" for p in ("c.dat", "d.dat", "e.dat")}),
        ("plain", True, {f"plain/{p}": "plain" for p in ("p1.bin", "tiny.txt", "empty")}),
    ):
        out = tmp_path / f"{folder}-{decrypt}"
        opts = ("--decrypt",) if decrypt else ()
        rc, res, _ = xfer(shared, shared.url(f"/{top}/{folder}", scheme=scheme), str(out) + "/",
                          scheme, *opts)
        assert res["ok"] and res["content"] == expected, (folder, decrypt)
        assert sorted(files_under(out)) == sorted(expected)
        for shown in expected:
            want = (served / shown) if shown.endswith(SUFFIX) else (local / shown)
            assert sha256(out / shown) == sha256(want), shown


# -- 4. wrong passphrase ---------------------------------------------------------------------------------
@SCHEMES
def test_wrong_passphrase_writes_nothing(shared: Daemon, tmp_path: Path, scheme: str) -> None:
    top = f"wp-{scheme}"
    served = shared.docroots["alice"] / top
    make_file(served / "a-plain.bin", 2 * BS, seed=20)  # planned first, yet never written either
    secret = make_file(tmp_path / "x.bin", 3 * BS + 1, seed=21)
    env.encrypt_file(secret, served / ("x.bin" + SUFFIX), PASS, BS)
    make_file(served / "z-plain.bin", BS, seed=22)

    # the whole folder: the run stops before moving anything
    out = tmp_path / "out"
    out.mkdir()
    rc, res, err = xfer(shared, shared.url(f"/{top}", scheme=scheme), str(out) + "/", scheme,
                        "--decrypt", pw=WRONG, check=False)
    assert rc == 1 and res["ok"] is False
    assert res["error"] == f"File decryption error, bad passphrase: {top}/x.bin{SUFFIX}"
    assert err.strip() == f"error: {res['error']}"
    assert res["sent_bytes"] == 0 and res["checksums"] == {}
    assert "decrypted" not in res["content"].values()
    assert everything(out) == []  # no plaintext, no partial, not even the folder

    # the single file, over an existing local copy: left as it was
    (out / "x.bin").write_bytes(b"previous contents")
    rc, res, err = xfer(shared, shared.url(f"/{top}/x.bin{SUFFIX}", scheme=scheme), str(out) + "/",
                        scheme, "--decrypt", pw=WRONG, check=False)
    assert rc == 1
    assert res["error"] == f"File decryption error, bad passphrase: x.bin{SUFFIX}"
    assert everything(out) == ["x.bin"]
    assert (out / "x.bin").read_bytes() == b"previous contents"
    assert WRONG not in shared.log()


@SCHEMES
def test_wrong_passphrase_leaves_no_new_folder(shared: Daemon, tmp_path: Path, scheme: str) -> None:
    """Before (trial): a download into ``new/`` (created by the download) with a wrong
    passphrase failed as it should, but left the empty folder ``new`` behind. Now a failed
    run removes the folders it created that stayed empty (folder and single file)."""
    top = f"wn-{scheme}"
    served = shared.docroots["alice"] / top
    secret = make_file(tmp_path / "y.bin", 2 * BS + 5, seed=23)
    (served / "sub").mkdir(parents=True)
    env.encrypt_file(secret, served / "sub" / ("y.bin" + SUFFIX), PASS, BS)
    for remote in (f"/{top}", f"/{top}/sub/y.bin{SUFFIX}"):
        new = tmp_path / "new"
        rc, res, err = xfer(shared, shared.url(remote, scheme=scheme), str(new) + "/", scheme,
                            "--decrypt", pw=WRONG, check=False)
        assert rc == 1 and "bad passphrase" in res["error"], (remote, err)
        assert not new.exists(), (remote, everything(new))


# -- 5. tampered envelopes ------------------------------------------------------------------------------
@SCHEMES
def test_tampered_block_is_caught_and_named(shared: Daemon, tmp_path: Path, scheme: str) -> None:
    top = f"tb-{scheme}"
    served = shared.docroots["alice"] / top
    secret = tmp_path / "t.bin"
    secret.write_bytes(os.urandom(6 * BS + 321))  # every block distinct
    plain = secret.read_bytes()
    stored = served / ("t.bin" + SUFFIX)
    served.mkdir()
    env.encrypt_file(secret, stored, PASS, BS)
    flip_bit(stored, HS + 3 * (BS + env.OVERHEAD) + env.NONCE_SIZE + 1000)  # inside block 3

    out = tmp_path / "out"
    out.mkdir()
    rc, res, err = xfer(shared, shared.url(f"/{top}/t.bin{SUFFIX}", scheme=scheme),
                        str(out) + "/", scheme, "--decrypt", check=False)
    assert rc == 1 and res["ok"] is False
    assert res["error"] == "t.bin: block 3: authentication failed"
    assert err.strip() == f"error: {res['error']}"
    assert res["checksums"] == {}
    assert not (out / "t.bin").exists() and not (out / ("t.bin" + SUFFIX)).exists()
    # what is kept for a resume is authenticated plaintext only: never block 3
    part = partial_path(out / "t.bin")
    if part.exists():
        assert 3 not in journaled(out / "t.bin")
        assert plain[3 * BS:4 * BS] not in part.read_bytes()

    # in a folder: the error names the file by its path in the folder
    rc, res, _ = xfer(shared, shared.url(f"/{top}", scheme=scheme), str(tmp_path / "dir") + "/",
                      scheme, "--decrypt", check=False)
    assert rc == 1 and res["error"] == f"t.bin{SUFFIX}: block 3: authentication failed"
    kept = [p.relative_to(tmp_path / "dir").as_posix()
            for p in ours(tmp_path / "dir" / top / "t.bin", tmp_path / "dir")]
    assert files_under(tmp_path / "dir" / top) == {}
    assert files_under(tmp_path / "dir").keys() <= {".fallback/README", *kept}

    # without --decrypt the damaged envelope is copied as stored (no key, nothing to check)
    raw = tmp_path / "raw"
    rc, res, _ = xfer(shared, shared.url(f"/{top}/t.bin{SUFFIX}", scheme=scheme),
                      str(raw) + "/", scheme)
    assert res["ok"] and res["content"] == {f"t.bin{SUFFIX}": "envelope"}
    assert sha256(raw / f"t.bin{SUFFIX}") == sha256(stored)


@SCHEMES
def test_tampered_or_truncated_header_is_an_error(shared: Daemon, tmp_path: Path,
                                                  scheme: str) -> None:
    top = f"th-{scheme}"
    served = shared.docroots["alice"] / top
    served.mkdir()
    secret = make_file(tmp_path / "h.bin", 2 * BS + 5, seed=31)
    good = tmp_path / ("good" + SUFFIX)
    env.encrypt_file(secret, good, PASS, BS)
    cases: dict[str, Callable[[Path], None]] = {
        "salt": lambda p: flip_bit(p, 20),  # caught by the header checksum (and the key check)
        "truncated": lambda p: os.truncate(p, p.stat().st_size - 100),  # last block cut short
    }
    for case, damage in cases.items():
        stored = served / f"{case}{SUFFIX}"
        shutil.copy2(good, stored)
        damage(stored)
        out = tmp_path / case
        out.mkdir()
        rc, res, err = xfer(shared, shared.url(f"/{top}/{case}{SUFFIX}", scheme=scheme),
                            str(out) + "/", scheme, "--decrypt", check=False)
        assert rc == 1 and res["ok"] is False, (case, res)
        assert res["error"] == ("File decryption error, damaged envelope or not an envelope: "
                                f"{case}{SUFFIX}"), res["error"]
        assert err.strip() == f"error: {res['error']}"
        assert everything(out) == [], case  # no plaintext, no partial, nothing

    # without --decrypt the damaged objects are still downloadable as they are stored
    out = tmp_path / "raw"
    rc, res, _ = xfer(shared, shared.url(f"/{top}", scheme=scheme), str(out) + "/", scheme)
    assert res["ok"] and res["content"] == {f"{top}/{c}{SUFFIX}": "plain" for c in cases}
    for case in cases:
        assert sha256(out / top / f"{case}{SUFFIX}") == sha256(served / f"{case}{SUFFIX}")


# -- 6. resume of encrypted uploads and downloads ---------------------------------------------------------
RESUME_SIZE = 60 << 20  # 240 blocks of 256 KiB


@SCHEMES
def test_killed_encrypted_upload_resumes_with_the_same_envelope(shared: Daemon, tmp_path: Path,
                                                                scheme: str) -> None:
    src = make_file(tmp_path / "big.bin", RESUME_SIZE, seed=40)
    folder = shared.docroots["alice"] / f"ru-{scheme}"
    target = folder / ("big.bin" + SUFFIX)
    proc = start(shared, str(src), shared.url(f"/ru-{scheme}/", scheme=scheme), scheme, *BSARG,
                 "--encrypt")
    docroot = shared.docroots["alice"]  # partials are kept at its top
    wait_partial(proc, target, 8 << 20, docroot)
    proc.send_signal(signal.SIGSTOP)  # the daemon drains what is in flight and journals it
    try:
        have = wait_journal_stable(target, root=docroot)
    finally:
        kill9(proc)
    count = RESUME_SIZE // BS
    assert 4 <= len(have) < count, f"{len(have)} blocks journaled: not an interrupted upload"
    assert not target.exists()
    header_before = partial_path(target, StateDir(docroot)).read_bytes()[:HS2]
    assert env.EnvelopeHeader.decode(header_before).plain_size == RESUME_SIZE

    rc, res, err = xfer(shared, str(src), shared.url(f"/ru-{scheme}/", scheme=scheme), scheme,
                        *BSARG, "--encrypt")
    assert rc == 0 and res["ok"] and res["transports"] == [scheme]
    assert res["skipped_bytes"] >= len(have) * BS > 0
    assert res["sent_bytes"] + res["skipped_bytes"] == RESUME_SIZE
    assert res["sent_bytes"] <= RESUME_SIZE - len(have) * BS
    assert res["checksums"] == {"big.bin": digest_path(src, BS)}
    assert files_under(folder) == {"big.bin" + SUFFIX: stored_size(RESUME_SIZE)}
    # the resumed run reused the partial's header (same salt), so the stored file is one
    # valid envelope: it decrypts, every block authenticating, to the source
    assert target.read_bytes()[:HS2] == header_before
    out = tmp_path / "plain.bin"
    p = cli("decrypt", str(target), str(out))
    assert p.returncode == 0, p.stderr
    assert sha256(out) == sha256(src)


@SCHEMES
def test_killed_decrypting_download_resumes(shared: Daemon, tmp_path: Path, scheme: str) -> None:
    src = make_file(tmp_path / "big.bin", RESUME_SIZE, seed=41)
    served = shared.docroots["alice"] / f"rd-{scheme}" / ("big.bin" + SUFFIX)
    served.parent.mkdir()
    env.encrypt_file(src, served, PASS, BS)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "big.bin"  # a decrypting download keeps its partial under the plain name
    url = shared.url(f"/rd-{scheme}/big.bin{SUFFIX}", scheme=scheme)
    proc = start(shared, url, str(out) + "/", scheme, "--decrypt")
    assert shared.proc is not None
    try:
        wait_partial(proc, target, 8 << 20)
        shared.proc.send_signal(signal.SIGSTOP)  # freeze the sender; the client journals what it got
        try:
            have = wait_journal_stable(target)
        finally:
            kill9(proc)
    finally:
        shared.proc.send_signal(signal.SIGCONT)
    count = RESUME_SIZE // BS
    assert 4 <= len(have) < count, f"{len(have)} blocks journaled: not an interrupted download"
    assert not target.exists()
    assert hidden_beside(out) == [] and parts(out) == sorted(p.name for p in ours(target))

    rc, res, _ = xfer(shared, url, str(out) + "/", scheme, "--decrypt")
    assert rc == 0 and res["ok"] and res["content"] == {"big.bin": "decrypted"}
    assert res["skipped_bytes"] >= len(have) * BS > 0
    assert res["sent_bytes"] + res["skipped_bytes"] == RESUME_SIZE
    assert res["checksums"] == {"big.bin": digest_path(src, BS)}
    assert files_under(out) == {"big.bin": RESUME_SIZE}
    assert sha256(target) == sha256(src)


# -- 7. fallback encrypt / decrypt without a daemon ---------------------------------------------------
def test_encrypt_decrypt_commands_without_daemon(tmp_path: Path) -> None:
    src = patterned(tmp_path / "notes.txt", 3 * BS + 77)
    p = cli("encrypt", str(src))
    assert p.returncode == 0, p.stderr
    enc = tmp_path / ("notes.txt" + SUFFIX)
    assert p.stdout.strip() == str(enc)
    data = enc.read_bytes()
    assert data.startswith(b"FBENV") and UNIT[:32] not in data
    assert PASS not in p.stdout + p.stderr

    out = tmp_path / "out.txt"
    p = cli("decrypt", str(enc), str(out))
    assert p.returncode == 0, p.stderr
    assert sha256(out) == sha256(src)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes.txt", "notes.txt" + SUFFIX,
                                                          "out.txt"]

    # wrong passphrase: exit 1, clear message, no output (not even a hidden partial)
    bad = tmp_path / "bad.txt"
    p = cli("decrypt", str(enc), str(bad), pw=WRONG)
    assert p.returncode == 1
    assert "bad passphrase" in p.stderr and str(enc) in p.stderr
    assert "Traceback" not in p.stderr and WRONG not in p.stderr
    assert not bad.exists() and hidden(tmp_path) == []

    # a flipped bit in the last block (``fallback encrypt`` uses the default block size):
    # exit 1, the block is named, no output
    layout = env.EnvelopeHeader.decode(data).layout
    last = layout.count - 1
    flip_bit(enc, layout.stored_range(last)[0] + 500)
    p = cli("decrypt", str(enc), str(bad))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"block {last}: authentication failed" in p.stderr
    assert not bad.exists() and hidden(tmp_path) == []

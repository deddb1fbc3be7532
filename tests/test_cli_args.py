"""Arguments as scp, cp, curl and ascp users type them (issue 14, second part).

Several sources, ``-`` for standard input and output, ascp's aliases (-P, -k, -l, -m,
--file-list, --src-base, -N/-E, --remove-after-transfer, -p, --dry-run), the symbolic
link policy, a download's destination folders, messages that name the port or path,
the summary and the progress bar, and the Python API's arguments. Real daemons, real
processes, real files; the terminal is a pty.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fallback import Options, TransferError, UsageError, transfer, transfer_async
from fallback.cliargs import parse
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from tests.test_cli_ux import Terminal, base_env, fb, last_json


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    b = tmp_path_factory.mktemp("args")
    d = Daemon(b, free_port(), free_port(), {"alice": b / "docroot" / "alice"})
    d.start()
    root = d.docroots["alice"]
    make_file(root / "out" / "one.bin", 70_000, seed=1)
    make_file(root / "out" / "two.bin", 90_000, seed=2)
    make_file(root / "afile.txt", 100, seed=3)
    yield d
    assert d.stop() == 0


def cli(d: Daemon, *args: str, tmp: Path, stdin: bytes | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = base_env(tmp, PASSWORDS["alice"])
    return subprocess.run(fb("transfer", *args, "--fingerprint", d.fingerprint),
                          capture_output=True, env=env, input=stdin, timeout=120, cwd=cwd,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def js(p: subprocess.CompletedProcess[bytes]) -> dict:
    return last_json(p.stdout.decode())


def err(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stderr.decode()


# -- several sources, - ---------------------------------------------------------------------------
def test_several_sources_up_and_several_remote_sources_down(srv: Daemon, tmp_path: Path) -> None:
    a = make_file(tmp_path / "a.txt", 1000, seed=4)
    make_file(tmp_path / "b" / "inner.bin", 2000, seed=5)
    c = make_file(tmp_path / "c.iso", 3000, seed=6)
    p = cli(srv, str(a), str(tmp_path / "b"), str(c), srv.url("/multi"), "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    res = js(p)
    assert res["ok"] and res["files"] == 3 and res["bytes"] == 6000
    assert set(res["checksums"]) == {"a.txt", "b/inner.bin", "c.iso"}
    root = srv.docroots["alice"] / "multi"  # DST became a folder: the sources went into it
    assert sha256(root / "a.txt") == sha256(a) and sha256(root / "c.iso") == sha256(c)
    assert (root / "b" / "inner.bin").stat().st_size == 2000

    down = tmp_path / "down"  # a new folder, its last level only, is created
    p = cli(srv, srv.url("/out/one.bin"), srv.url("/out/two.bin"), f"{down}/", "--json",
            tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert js(p)["files"] == 2
    for n in ("one.bin", "two.bin"):
        assert sha256(down / n) == sha256(srv.docroots["alice"] / "out" / n)

    p = cli(srv, srv.url("/out/one.bin"), srv.url("/out/two.bin", user="bob"), f"{down}/",
            "--json", tmp=tmp_path)
    assert p.returncode == 2 and "different daemons or users" in js(p)["error"]
    # mixing directions is a usage error, with the JSON line
    p = cli(srv, str(a), srv.url("/out/one.bin"), str(tmp_path / "x"), "--json", tmp=tmp_path)
    assert p.returncode == 2 and "mix URLs and local paths" in js(p)["error"]


def test_dash_reads_stdin_and_writes_stdout(srv: Daemon, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    p = cli(srv, "-", srv.url("/stdin/piped.bin"), "--json", tmp=tmp_path, stdin=data)
    assert p.returncode == 0, err(p)
    res = js(p)
    assert res["ok"] and res["stdio"] == "stdin" and list(res["checksums"]) == ["piped.bin"]
    assert (srv.docroots["alice"] / "stdin" / "piped.bin").read_bytes() == data

    p = cli(srv, srv.url("/stdin/piped.bin"), "-", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert p.stdout == data  # the file, and nothing else, on stdout
    assert "verified in full before it was written to standard output" in err(p)

    # - as the source needs DST to name the file; - as DST one remote file and no --json
    p = cli(srv, "-", srv.url("/stdin/"), "--json", tmp=tmp_path, stdin=b"x")
    assert p.returncode == 2 and "must name the file" in js(p)["error"]
    p = cli(srv, srv.url("/stdin/piped.bin"), "-", "--json", tmp=tmp_path)
    assert p.returncode == 2 and "--json" in err(p)
    p = cli(srv, srv.url("/out/"), "-", tmp=tmp_path)
    assert p.returncode != 0 and p.stdout == b""


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_dash_to_a_slow_pipe_loses_no_byte(srv: Daemon, tmp_path: Path, unbuffered: str) -> None:
    """Before: under PYTHONUNBUFFERED=1 stdout is a raw FileIO, a write into a full pipe
    took 64 KiB of each 1 MiB chunk and the rest was dropped: a trial got 8,016,960 of
    9,000,000 bytes, exit 0, "verified in full". Here the reader starts late."""
    data = os.urandom(9_000_000)
    (srv.docroots["alice"] / "slowpipe").mkdir(exist_ok=True)
    (srv.docroots["alice"] / "slowpipe" / "big.bin").write_bytes(data)
    env = base_env(tmp_path, PASSWORDS["alice"], PYTHONUNBUFFERED=unbuffered)
    p = subprocess.Popen(fb("transfer", srv.url("/slowpipe/big.bin"), "-", "--fingerprint",
                            srv.fingerprint), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.read(1)  # the transfer is verified; its copy to us is under way
    time.sleep(1.5)  # the pipe fills: writes come back short
    out = first + p.stdout.read()
    assert p.wait(60) == 0, p.stderr.read()
    assert len(out) == len(data) and out == data


def test_a_password_in_a_url_is_never_printed(srv: Daemon, tmp_path: Path) -> None:
    """Before: "bad URL 'https://alice:secret@...'" and "1 of 2 sources failed:
    https://alice:secret@..." (also in the JSON error): CI logs keep them (trial)."""
    pw = PASSWORDS["alice"]
    base = f"https://alice:{pw}@127.0.0.1:{srv.https_port}"
    p = cli(srv, f"{base}/proj/we#ird.txt", str(tmp_path / "dl") + "/", "--json", tmp=tmp_path)
    assert p.returncode == 2 and "alice:***@127.0.0.1" in js(p)["error"]
    p2 = cli(srv, f"{base}/nosuch.bin", f"{base}/nosuch2.bin", str(tmp_path / "dl") + "/",
             "--json", tmp=tmp_path)
    assert p2.returncode == 1 and "alice:***@" in js(p2)["error"]
    for out in (p.stdout, p.stderr, p2.stdout, p2.stderr):
        assert pw.encode() not in out


# -- ascp's aliases -------------------------------------------------------------------------------
def test_port_resume_level_and_rate_aliases(srv: Daemon, tmp_path: Path) -> None:
    a = make_file(tmp_path / "p.bin", 5000, seed=7)
    wrong = f"https://alice@127.0.0.1:{free_port()}/ports/"
    p = cli(srv, str(a), wrong, "-P", str(srv.https_port), "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert (srv.docroots["alice"] / "ports" / "p.bin").exists()
    levels = {"0": "none", "1": "attrs", "2": "sparse", "3": "full"}
    for k, mode in levels.items():
        assert parse(["transfer", "-k", k, "a", "b"])[0].resume == mode
    p = cli(srv, str(a), srv.url("/ports/"), "-k", "7", "--json", tmp=tmp_path)
    assert p.returncode == 2 and "-k takes 0, 1, 2 or 3" in js(p)["error"]
    # -l and -m are --target-rate and --min-rate: the floor above the cap is refused
    p = cli(srv, str(a), srv.url("/ports/"), "-l", "10M", "-m", "20M", "--json", tmp=tmp_path)
    assert p.returncode == 2 and "--min-rate must not exceed --target-rate" in js(p)["error"]
    p = cli(srv, str(a), srv.url("/ports/"), "-l", "50M", "-p", "--json", tmp=tmp_path)
    assert p.returncode == 0 and js(p)["ok"], err(p)


def test_file_list_with_src_base(srv: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "data"
    x = make_file(data / "a" / "x.txt", 100, seed=8)
    y = make_file(data / "b" / "c" / "y.txt", 200, seed=9)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{x}\n\n{y}\n")
    p = cli(srv, "--file-list", str(listing), "--src-base", str(data), srv.url("/based/"),
            "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    root = srv.docroots["alice"] / "based"
    assert sha256(root / "a" / "x.txt") == sha256(x)
    assert sha256(root / "b" / "c" / "y.txt") == sha256(y)
    assert set(js(p)["checksums"]) == {"a/x.txt", "b/c/y.txt"}
    p = cli(srv, str(x), "--src-base", str(data / "b"), srv.url("/based/"), "--json", tmp=tmp_path)
    assert p.returncode == 2 and "is not below it" in js(p)["error"]
    # downloads too: the remote folders below the base are kept
    back = tmp_path / "back"
    p = cli(srv, srv.url("/based/a/x.txt"), srv.url("/based/b/c/y.txt"), "--src-base", "/based",
            f"{back}/", "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert sha256(back / "a" / "x.txt") == sha256(x)
    assert sha256(back / "b" / "c" / "y.txt") == sha256(y)


def test_include_exclude_rules_as_ascp(srv: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for rel in ("a.txt", "b.log", "sub/c.txt", "sub/d.log", "skipme/e.txt"):
        make_file(tree / rel, 10, seed=len(rel))
    # first match decides: the skipme folder goes (and its contents with it), then every
    # folder is kept, .txt files are kept, the rest excluded
    p = cli(srv, str(tree), srv.url("/filtered/"), "-E", "skipme/", "-N", "*/", "-N", "*.txt",
            "-E", "*", "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    res = js(p)
    assert set(res["checksums"]) == {"tree/a.txt", "tree/sub/c.txt"}
    assert res["skipped_files"] == {"tree/skipme": "excluded by -E 'skipme/'",
                                    "tree/b.log": "excluded by -E '*'",
                                    "tree/sub/d.log": "excluded by -E '*'"}
    got = sorted(str(q.relative_to(srv.docroots["alice"] / "filtered"))
                 for q in (srv.docroots["alice"] / "filtered").rglob("*"))
    assert got == ["tree", "tree/a.txt", "tree/sub", "tree/sub/c.txt"]
    # downloads too: only .bin files named one*
    p = cli(srv, srv.url("/out"), f"{tmp_path / 'fdown'}/", "-N", "one*", "-E", "*.bin", "--json",
            tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert set(js(p)["checksums"]) == {"out/one.bin"}
    assert sorted(q.name for q in (tmp_path / "fdown" / "out").iterdir()) == ["one.bin"]


def test_remove_after_transfer_only_removes_verified_files(srv: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "rm"
    make_file(src / "new.bin", 4000, seed=10)
    kept = make_file(src / "kept.bin", 4000, seed=11)
    make_file(srv.docroots["alice"] / "rmdst" / "rm" / "kept.bin", 10, seed=12)  # different
    p = cli(srv, str(src), srv.url("/rmdst/"), "--overwrite", "never", "--remove-after-transfer",
            "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    res = js(p)
    assert res["removed"] == ["rm/new.bin"] and res["skipped_files"] == {"rm/kept.bin": "exists"}
    assert not (src / "new.bin").exists() and kept.exists() and src.is_dir()
    assert (srv.docroots["alice"] / "rmdst" / "rm" / "new.bin").stat().st_size == 4000
    p = cli(srv, srv.url("/out/one.bin"), str(tmp_path), "--remove-after-transfer", "--json",
            tmp=tmp_path)
    assert p.returncode == 2 and "applies to uploads" in js(p)["error"]


def test_dry_run_lists_and_moves_nothing(srv: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "dry"
    make_file(tree / "a.bin", 100, seed=13)
    make_file(tree / "s" / "b.bin", 100, seed=14)
    p = cli(srv, str(tree), srv.url("/dryrun/"), "--dry-run", "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    res = js(p)
    assert res["dry_run"] is True and sorted(res["would_transfer"]) == ["dry/a.bin", "dry/s/b.bin"]
    assert res["sent_bytes"] == 0 and res["transports"] == [] and res["checksums"] == {}
    assert not (srv.docroots["alice"] / "dryrun").exists()
    p = cli(srv, srv.url("/out/"), f"{tmp_path / 'drydown'}/", "--dry-run", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert "dry run: 2 files would be fetched" in p.stdout.decode()
    assert not (tmp_path / "drydown").exists()
    # unchanged files (the default --overwrite diff compares digests) are listed as skipped,
    # as the real run skips them; a changed one as moving (a trial found all listed as moving)
    p = cli(srv, str(tree), srv.url("/dryrun/"), "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    make_file(tree / "s" / "b.bin", 100, seed=15)  # same size, other bytes
    p = cli(srv, str(tree), srv.url("/dryrun/"), "--dry-run", "--json", tmp=tmp_path)
    res = js(p)
    assert res["would_transfer"] == ["dry/s/b.bin"], res
    assert res["skipped_files"] == {"dry/a.bin": "unchanged"}
    back = tmp_path / "back"
    p = cli(srv, srv.url("/dryrun/dry/"), f"{back}/", "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    make_file(back / "dry" / "a.bin", 100, seed=16)
    p = cli(srv, srv.url("/dryrun/dry/"), f"{back}/", "--dry-run", "--json", tmp=tmp_path)
    res = js(p)
    assert res["would_transfer"] == ["dry/a.bin"] and res["skipped_files"] == {
        "dry/s/b.bin": "unchanged"}, res


# -- symbolic links -------------------------------------------------------------------------------
def test_symbolic_link_policy(srv: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "links"
    make_file(tree / "real.txt", 50, seed=15)
    (tree / "sub").mkdir()
    secret = make_file(tmp_path / "outside.txt", 60, seed=16)
    os.symlink(secret, tree / "abs")  # leads out of the source folder
    os.symlink("real.txt", tree / "inside")
    os.symlink("missing", tree / "dangling")
    os.symlink("sub", tree / "dirlink")

    p = cli(srv, str(tree), srv.url("/l1/"), "--json", tmp=tmp_path)  # default: follow
    assert p.returncode == 0, err(p)
    res = js(p)
    assert set(res["checksums"]) == {"links/real.txt", "links/inside"}
    assert set(res["skipped_files"]) == {"links/abs", "links/dangling", "links/dirlink"}
    assert "outside the source folder" in res["skipped_files"]["links/abs"]
    assert "dangling" in res["skipped_files"]["links/dangling"]
    assert "folder not followed" in res["skipped_files"]["links/dirlink"]
    assert not (srv.docroots["alice"] / "l1" / "links" / "abs").exists()

    p = cli(srv, str(tree), srv.url("/l2/"), "--symbolic-links", "follow-all", "--json",
            tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert sha256(srv.docroots["alice"] / "l2" / "links" / "abs") == sha256(secret)

    p = cli(srv, str(tree), srv.url("/l3/"), "--symbolic-links", "skip", "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert set(js(p)["checksums"]) == {"links/real.txt"}
    assert len(js(p)["skipped_files"]) == 4

    # a link named on the command line is followed and lands under its own name
    p = cli(srv, str(tree / "inside"), srv.url("/l4/"), "--json", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert list(js(p)["checksums"]) == ["inside"]
    assert (srv.docroots["alice"] / "l4" / "inside").exists()
    assert not (srv.docroots["alice"] / "l4" / "real.txt").exists()


# -- destinations and messages --------------------------------------------------------------------
def test_download_creates_only_the_last_level(srv: Daemon, tmp_path: Path) -> None:
    p = cli(srv, srv.url("/out/one.bin"), str(tmp_path / "no/such/dir/x.iso"), "--json",
            tmp=tmp_path)
    assert p.returncode == 1
    assert "no/such/dir: no such folder" in js(p)["error"]
    assert not (tmp_path / "no").exists()
    p = cli(srv, srv.url("/out/one.bin"), f"{tmp_path / 'fresh'}/", tmp=tmp_path)
    assert p.returncode == 0, err(p)
    assert (tmp_path / "fresh" / "one.bin").stat().st_size == 70_000


def test_messages_name_the_path_or_port(srv: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "m.bin", 100, seed=17)
    cases = [
        ((srv.url("/in/nosuch.iso"), str(tmp_path / "o.iso")), "remote /in/nosuch.iso: not found"),
        ((str(f), srv.url("/afile.txt/")),
         "remote /afile.txt: a file, not a folder (cannot write /afile.txt/m.bin)"),
        ((str(f), f"https://alice@127.0.0.1:{free_port()}/in/"), "connection refused"),
        ((str(f), f"https://alice@127.0.0.1:{srv.http_port}/in/"),
         f"port {srv.http_port} speaks plain HTTP: use http://127.0.0.1:{srv.http_port}/in/"),
        ((str(f), f"http://alice@127.0.0.1:{srv.https_port}/in/"),
         f"port {srv.https_port} speaks HTTPS only: use https://127.0.0.1:{srv.https_port}/in/"),
    ]
    for args, message in cases:
        p = cli(srv, *args, tmp=tmp_path)
        assert p.returncode == 1, (args, err(p))
        lines = err(p).strip().splitlines()
        assert lines == [f"error: {lines[0][7:]}"] and message in lines[0], (message, lines)
    # a plain HTTP request to the TLS-only port: a 400 with a text body, not an empty reply
    c = http.client.HTTPConnection("127.0.0.1", srv.https_port, timeout=10)
    c.request("GET", "/afile.txt")
    r = c.getresponse()
    assert r.status == 400 and b"HTTPS only" in r.read()
    c.close()


def test_os_errors_never_name_fallbacks_own_files(tmp_path: Path) -> None:
    from fallback.client.session import os_message

    partial = tmp_path / ".fallback" / "parts" / "0123abcd.partial"
    try:
        open(partial, "rb")
    except OSError as exc:
        msg = os_message(exc, str(tmp_path / "big.iso"))
    assert msg == f"{tmp_path / 'big.iso'}: No such file or directory"
    try:
        os.mkdir(make_file(tmp_path / "afile.txt", 1) / "x")
    except OSError as exc:
        assert exc.errno == errno.ENOTDIR
        assert os_message(exc, "unused") == f"{tmp_path / 'afile.txt' / 'x'}: not a folder " \
                                            "(a file is in the way)"


# -- output ---------------------------------------------------------------------------------------
def test_summary_says_what_a_run_that_sent_nothing_did() -> None:
    """Before: a new empty file said "0 B already there, nothing sent", and a file kept by
    --overwrite never (the destination differs) "9.0 MB already there" (trial)."""
    from fallback.cli import summary
    from fallback.result import TransferResult
    empty = TransferResult(ok=True, direction="upload", files=1, bytes=0, seconds=0.1)
    assert summary(empty)[0] == "upload ok: 1 file, 0 B, nothing to send (0.10 s)"
    kept = TransferResult(ok=True, direction="download", files=1, bytes=9_000_000,
                          skipped_bytes=9_000_000, seconds=0.2, skipped_files={"big.bin": "exists"})
    assert summary(kept)[:2] == ["download ok: 1 file, 9.0 MB not sent: see below (0.20 s)",
                                 "skipped big.bin: exists"]
    same = TransferResult(ok=True, direction="upload", files=1, bytes=9_000_000,
                          skipped_bytes=9_000_000, seconds=0.2,
                          skipped_files={"big.bin": "unchanged"}, checksums={"big.bin": "b3:x"})
    assert summary(same)[0] == "upload ok: 1 file, 9.0 MB already there, nothing sent (0.20 s)"


def test_summary_units_plurals_and_no_rate_when_nothing_moved(srv: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "s.bin", 2_500_000, seed=18)
    p = cli(srv, str(f), srv.url("/sum/"), tmp=tmp_path)
    assert p.returncode == 0, err(p)
    out = p.stdout.decode()
    assert re.search(r"upload ok: 1 file, 2\.5 MB \(2\.5 MB sent, 0 B already there\) in "
                     r"[\d.]+ s, [\d.]+ MB/s over https", out), out
    p = cli(srv, str(f), srv.url("/sum/"), tmp=tmp_path)  # unchanged: nothing moves
    out = p.stdout.decode()
    assert "upload ok: 1 file, 2.5 MB already there, nothing sent" in out and "MB/s" not in out
    p = cli(srv, str(f), srv.url("/sum/"), "--json", tmp=tmp_path)
    res = js(p)
    assert res["sent_bytes"] == 0 and res["rate_mbps"] == 0 and res["transports"] == []
    passphrase = {"FALLBACK_FILEPASS": "a long Passphrase 123"}
    env = base_env(tmp_path, PASSWORDS["alice"], **passphrase)
    p2 = subprocess.run(fb("transfer", str(f), srv.url("/sum/"), "--encrypt", "--fingerprint",
                           srv.fingerprint), capture_output=True, text=True, env=env, timeout=120,
                        stdin=subprocess.DEVNULL)
    assert p2.returncode == 0, p2.stderr
    assert "stored s.bin encrypted as s.bin.fallback-env" in p2.stdout
    assert (srv.docroots["alice"] / "sum" / "s.bin.fallback-env").exists()


def test_progress_bar_on_a_narrow_terminal(srv: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / ("a-folder-with-a-rather-long-name-" * 2)
    for k in range(3):
        make_file(tree / f"file-{k}-with-a-long-name-as-well.bin", 3_000_000, seed=20 + k)
    env = base_env(tmp_path, PASSWORDS["alice"])
    first = tree / "file-0-with-a-long-name-as-well.bin"  # already there: its bytes are kept
    p = cli(srv, str(first), srv.url(f"/bar/{tree.name}/"), tmp=tmp_path)
    assert p.returncode == 0, err(p)
    t = Terminal(fb("transfer", str(tree), srv.url("/bar/"), "--fingerprint", srv.fingerprint,
                    "-l", "40M"), env, columns=100)
    assert t.wait() == 0, t.out
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", t.out)
    assert re.search(r"\d/3 files", plain), plain
    assert "ETA" in plain and "MB/s" in plain and "(3.0 MB kept)" in plain
    assert "…" in plain  # the name was shortened, the numbers kept
    assert "3 files" in plain and "upload ok" in plain


# -- Python API -----------------------------------------------------------------------------------
def test_api_same_arguments_and_usage_errors_before_connecting(srv: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "api.bin", 200_000, seed=30)
    closed = f"https://alice@127.0.0.1:{free_port()}/in/"  # a connection would fail there
    for kw, needle in ((dict(block_size="4Q"), "bad size"), (dict(blok_size=4096), "block_size"),
                       (dict(streams="4"), "streams"), (dict(target_rate="fast"), "bad rate"),
                       (dict(filters=(("exclude", "[z-a]"),)), "bad pattern"),
                       (dict(symbolic_links="copy"), "^symbolic_links"),  # the keyword
                       # a trial got TypeError or silent acceptance for these
                       (dict(filters=5), "filters must be"), (dict(retries=2.5), "retries"),
                       (dict(udp_port="33001"), "udp_port")):
        with pytest.raises(UsageError, match=needle):
            transfer(str(f), closed, password="x", **kw)
        with pytest.raises(UsageError, match=needle):
            asyncio.run(transfer_async(str(f), closed, password="x", **kw))
    for bad in (None, 123):
        with pytest.raises(UsageError, match="^src must be a path or URL string"):
            transfer(bad, closed, password="x")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not both"):
        transfer(str(f), closed, Options(), streams=2)
    with pytest.raises(UsageError, match="not both"):
        asyncio.run(transfer_async(str(f), closed, Options(), streams=2))
    kw = dict(password=PASSWORDS["alice"], fingerprint=srv.fingerprint, block_size="64K",
              target_rate="500M")
    res = transfer(str(f), srv.url("/api/"), **kw)
    assert res.ok and res.files == 1
    res = asyncio.run(transfer_async(srv.url("/api/api.bin"), str(tmp_path / "back.bin"), **kw))
    assert res.ok and sha256(tmp_path / "back.bin") == sha256(f)
    res = transfer(str(f), srv.url("/api/"), Options(**kw))  # the same through an Options
    assert res.ok and res.sent_bytes == 0
    with pytest.raises(TransferError):
        transfer(str(f), closed, password="x")


def test_failures_name_the_proxy_and_report_no_transport(srv: Daemon, tmp_path: Path) -> None:
    """A proxy whose name does not resolve is named as the proxy, not as the daemon; a
    failed run that moved nothing lists no transport (a trial saw both wrong)."""
    f = make_file(tmp_path / "p.bin", 1000, seed=31)
    p = cli(srv, str(f), srv.url("/"), "--proxy", "no-such-proxy.invalid:3128", "--json",
            "--retries", "0", tmp=tmp_path)
    res = js(p)
    assert p.returncode == 1 and "cannot reach the proxy http://no-such-proxy.invalid:3128" \
        in res["error"], res
    assert res["transports"] == []
    env = base_env(tmp_path, "wrong password")
    p = subprocess.run(fb("transfer", str(f), srv.url("/"), "--fingerprint", srv.fingerprint,
                          "--json"), capture_output=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    res = js(p)
    assert p.returncode == 3 and res["transports"] == [] and res["sent_bytes"] == 0, res


def test_the_last_progress_event_counts_empty_files_done() -> None:
    """Before: a folder with one file and two empty ones ended on 1 of 3 files (trial)."""
    from fallback.result import Progress, ProgressEvent
    events: list[ProgressEvent] = []
    p = Progress(5, "https", events.append, {"d/a.txt": 5, "d/e1": 0, "d/e2": 0})
    p.carry(5, "d/a.txt")
    p.finish()
    assert events[-1].done and (events[-1].files_done, events[-1].files_total) == (3, 3)


def test_a_download_of_the_docroot_goes_by_the_users_name(tmp_path: Path) -> None:
    """Before: a download of / was named after the daemon's docroot folder ("rw/..."),
    showing the server's own layout (trial). Now after the user."""
    d = Daemon(tmp_path / "d", free_port(), free_port(), {"alice": tmp_path / "srv-secret-rw"})
    d.base.mkdir()
    d.start()
    try:
        make_file(tmp_path / "srv-secret-rw" / "x.bin", 1000, seed=3)
        p = cli(d, d.url("/"), str(tmp_path / "dl") + "/", "--json", tmp=tmp_path)
        assert p.returncode == 0, err(p)
        assert list(js(p)["checksums"]) == ["alice/x.bin"]
        assert (tmp_path / "dl" / "alice" / "x.bin").exists()
        assert b"srv-secret-rw" not in p.stdout + p.stderr
    finally:
        d.stop()


def test_summary_counts_skips_beyond_ten_per_reason() -> None:
    """Before: a re-sync of 5,000 unchanged files printed 5,000 "skipped" lines (trial)."""
    from fallback.cli import SKIPPED_LISTED, summary
    from fallback.result import TransferResult
    skipped = {f"d/f{i:04d}": "unchanged" for i in range(5000)}
    skipped["d/link"] = "symbolic link leading outside the source folder"
    res = TransferResult(ok=True, direction="upload", files=5001, bytes=5000,
                         skipped_bytes=5000, seconds=0.5, skipped_files=skipped,
                         checksums=dict.fromkeys(skipped, "b3:x"))
    lines = summary(res)
    assert lines[1:SKIPPED_LISTED + 1] == [f"skipped d/f{i:04d}: unchanged"
                                           for i in range(SKIPPED_LISTED)]
    assert lines[SKIPPED_LISTED + 1] == "skipped 4990 more: unchanged (--json lists every one)"
    assert "skipped d/link: symbolic link leading outside the source folder" in lines
    assert len(lines) == SKIPPED_LISTED + 3


def test_several_sources_keep_the_udp_and_path_figures() -> None:
    """Before: the merged result of several sources summed only counts and maps: rtt_ms,
    datagram_size, hole_bytes, switches, transport_reason came out 0 or empty (trial)."""
    from fallback.clisources import Job, merge
    from fallback.result import Switch, TransferResult
    a = TransferResult(ok=True, direction="upload", transports=["https", "udp"], files=1,
                       bytes=100, sent_bytes=100, hole_bytes=4096, seconds=2.0,
                       retransmitted_bytes=3, loss_pct=1.0, rtt_ms=20.0, datagram_size=65000,
                       transport_reason="the URL says https://",
                       switches=[Switch(0.2, "https", "udp", "UDP probe answered in 1 ms")])
    b = TransferResult(ok=True, direction="upload", transports=["https", "udp"], files=1,
                       bytes=300, sent_bytes=300, seconds=1.0, retransmitted_bytes=5,
                       loss_pct=3.0, rtt_ms=30.0, datagram_size=1452, retries=1,
                       transport_reason="the URL says https://",
                       switches=[Switch(0.5, "https", "udp", "UDP probe answered in 1 ms")])
    out = merge([(Job("a", "u"), a), (Job("b", "u"), b)], 3.5)
    assert (out.hole_bytes, out.retransmitted_bytes, out.retries) == (4096, 8, 1)
    assert out.loss_pct == 2.5 and out.rtt_ms == 30.0 and out.datagram_size == 1452
    assert out.transport_reason == "the URL says https://"
    assert [(s.at, s.to) for s in out.switches] == [(0.2, "udp"), (2.5, "udp")]


def test_summary_accounts_for_holes() -> None:
    """Before: "1 file, 1.1 GB (12.6 MB sent, 0 B already there)": the holes' 1.06 GB
    went unaccounted for (trial)."""
    from fallback.cli import summary
    from fallback.result import TransferResult
    res = TransferResult(ok=True, direction="upload", transports=["https", "udp"], files=1,
                         bytes=1_073_741_824, sent_bytes=12_582_912,
                         hole_bytes=1_061_158_912, seconds=2.0)
    assert summary(res)[0].startswith("upload ok: 1 file, 1.1 GB (12.6 MB sent, 0 B already "
                                      "there, 1.1 GB in holes) in 2.00 s")

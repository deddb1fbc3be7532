"""Every path, URL and value a user gives is checked before anything is touched (a new
user's trial): an empty source or destination is a usage error (never "the current
folder"), the Python API names the argument it refuses, a refused password is
``UNAUTHORIZED``, a file never lands inside a same-named folder, two sources never land
on one name, ``decrypt FILE -`` writes to standard output, an error names its path once,
and a malformed ``--proxy`` is a usage error. Every test failed before its fix."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import warnings
from pathlib import Path

import pytest

from fallback import Options, TransferError, UsageError, transfer, transfer_async
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from tests.test_cli_ux import base_env, fb, last_json, run
from transport.errors import ErrorKind


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1, 2: an empty path or option value is a usage error -----------------------------------------
def test_empty_paths_and_values_are_usage_errors(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    make_file(work / "keep1.txt", 1000)
    make_file(work / "sub" / "keep2.txt", 2000, seed=1)
    before = files_under(work)
    env = base_env(tmp_path, password=PASSWORDS["alice"])
    fp = ["--fingerprint", daemon.fingerprint]
    # FILE=; fallback transfer "$FILE" URL --remove-after-transfer: not the current folder
    p = run(fb("transfer", "", daemon.url("/x/"), "--remove-after-transfer", "--json", *fp),
            env, cwd=work)
    assert p.returncode == 2, p.stderr
    assert "empty" in last_json(p.stdout)["error"]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert files_under(work) == before
    assert not (daemon.docroots["alice"] / "x").exists()
    assert not (daemon.docroots["alice"] / "work").exists()
    # one empty source among others: nothing at all is sent
    p = run(fb("transfer", "keep1.txt", "", daemon.url("/x/"), *fp), env, cwd=work)
    assert p.returncode == 2, p.stderr
    assert not (daemon.docroots["alice"] / "x").exists()
    # an empty destination: neither the current folder nor the docroot's top
    make_file(daemon.docroots["alice"] / "f.txt", 500)
    p = run(fb("transfer", daemon.url("/f.txt"), "", "--json", *fp), env, cwd=work)
    assert p.returncode == 2, p.stderr
    assert "destination is empty" in last_json(p.stdout)["error"]
    assert files_under(work) == before
    p = run(fb("transfer", "keep1.txt", "", *fp), env, cwd=work)
    assert p.returncode == 2, p.stderr
    # empty option values that name a file, a prefix, a certificate, a proxy
    for flag in ("--cacert", "--password-file", "--file-list", "--src-base", "--proxy",
                 "--user", "--block-size"):
        p = run(fb("transfer", "keep1.txt", daemon.url("/y/"), flag, "", *fp), env, cwd=work)
        assert p.returncode == 2, (flag, p.stderr)
        assert f"{flag} is empty" in p.stderr, (flag, p.stderr)
    assert not (daemon.docroots["alice"] / "y").exists()
    # the other commands: '' is never "the default" nor "the current folder"
    for args in (("serve", "--config", ""), ("serve", "--docroot", ""), ("config", "validate", ""),
                 ("checksum", ""), ("encrypt", ""), ("decrypt", "", "out")):
        p = run(fb(*args), env, cwd=work, timeout=30)
        assert p.returncode == 2 and "empty" in p.stderr, (args, p.stderr)
    # the API: UsageError naming the end, nothing sent, nothing written
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.raises(UsageError, match="src is empty"):
            transfer("", daemon.url("/x/"), password=PASSWORDS["alice"],
                     fingerprint=daemon.fingerprint)
        with pytest.raises(UsageError, match="dst is empty"):
            transfer(daemon.url("/f.txt"), "", password=PASSWORDS["alice"],
                     fingerprint=daemon.fingerprint)
        with pytest.raises(UsageError, match="cacert is empty"):
            transfer("keep1.txt", daemon.url("/x/"), cacert="")
    finally:
        os.chdir(cwd)
    assert files_under(work) == before
    assert not (daemon.docroots["alice"] / "x").exists()


# -- 3: the Python API names the argument it refuses ------------------------------------------------
def test_api_names_the_argument_it_refuses_and_the_cli_its_flag(tmp_path: Path) -> None:
    src = make_file(tmp_path / "h.txt", 10)
    url = f"https://alice@127.0.0.1:{free_port()}/in/"  # nothing listens: no connection is made
    cases: list[tuple[tuple, dict, str]] = [
        ((b"h.txt", url), {}, "src must be a path or URL string"),
        ((str(src), url.encode()), {}, "dst must be a path or URL string"),
        ((str(src), url), {"cacert": 5}, "cacert must be"),
        ((str(src), url), {"fingerprint": 5}, "fingerprint must be"),
        ((str(src), url), {"password": 1234}, "password must be a string"),
        ((str(src), url), {"user": ["alice"]}, "user must be"),
        ((str(src), url), {"proxy": 8080}, "proxy must be"),
        ((str(src), url), {"transport": ["udp"]}, "transport must be a string"),
        ((str(src), url), {"udp_lost_after": "2"}, "udp_lost_after must be a number"),
        ((str(src), url), {"progress": 5}, "progress must be a callable"),
        ((str(src), url), {"streams": 0}, "streams must be between 1 and 64"),
        ((str(src), url), {"target_rate": "fast"}, "target_rate"),
        ((str(src), url), {"symbolic_links": "all"}, "symbolic_links must be one of"),
        ((str(src), url), {"stream": 1}, "did you mean"),
    ]
    for args, kw, message in cases:
        with pytest.raises(UsageError) as caught:
            transfer(*args, **kw)
        assert message in caught.value.message, (kw, caught.value.message)
        assert "--" not in caught.value.message, caught.value.message  # keywords, not flags
    secret = "1234"
    with pytest.raises(UsageError) as caught:
        transfer(str(src), url, password=int(secret))
    assert secret not in caught.value.message  # a password is never echoed
    # Options itself: an unknown keyword is a UsageError with the closest name, as transfer()
    with pytest.raises(UsageError, match="did you mean 'streams'"):
        Options(stream=4)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="streams must be between 1 and 64"):
        transfer(str(src), url, Options(streams=99))
    # a path object is taken, for the certificate too
    with pytest.raises(UsageError, match="streams"):
        transfer(src, url, cacert=tmp_path / "cert.pem", streams=0)
    assert Options.from_keywords(None, {"cacert": tmp_path / "c.pem"}).cacert == \
        str(tmp_path / "c.pem")
    # the CLI names its flags for the same checks
    env = base_env(tmp_path, password="x")
    for args, message in ((["--streams", "0"], "--streams must be between 1 and 64"),
                          (["--udp-lost-after", "0"], "--udp-lost-after must be"),
                          (["-l", "fast"], "--target-rate")):
        p = run(fb("transfer", str(src), url, *args), env)
        assert p.returncode == 2, p.stderr
        assert f"error: {message}" in p.stderr, p.stderr


def test_transfer_inside_a_running_loop_says_use_transfer_async(tmp_path: Path) -> None:
    src = make_file(tmp_path / "h.txt", 10)
    url = f"https://alice@127.0.0.1:{free_port()}/in/"

    async def main() -> str:
        with pytest.raises(UsageError) as caught:
            transfer(str(src), url)
        return caught.value.message

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        message = asyncio.run(main())
        gc.collect()
    assert "transfer_async" in message
    assert not [w for w in seen if "never awaited" in str(w.message)], \
        [str(w.message) for w in seen]

    async def via_async() -> None:  # the async twin refuses the same way
        with pytest.raises(UsageError, match="src is empty"):
            await transfer_async("", url)

    asyncio.run(via_async())


# -- 4: a refused password is UNAUTHORIZED through the API, exit 3 in the CLI ----------------------
def test_wrong_password_is_unauthorized(daemon: Daemon, tmp_path: Path) -> None:
    src = make_file(tmp_path / "h.txt", 100)
    with pytest.raises(TransferError) as caught:
        transfer(str(src), daemon.url("/in/"), password="wrong",
                 fingerprint=daemon.fingerprint)
    assert (caught.value.kind, caught.value.status) == (ErrorKind.UNAUTHORIZED, 401)
    rc, _, _ = daemon.transfer(str(src), daemon.url("/in/"), password="wrong", check=False)
    assert rc == 3


# -- 5: a file never lands inside a same-named folder ------------------------------------------------
def test_download_onto_a_same_named_folder_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    root = daemon.docroots["alice"]
    make_file(root / "h.txt", 1000)
    make_file(root / "dir" / "a.txt", 1000, seed=1)
    make_file(root / "dir" / "b.txt", 1000, seed=2)
    dst = tmp_path / "d"
    (dst / "h.txt").mkdir(parents=True)
    for target in (str(dst) + "/", str(dst)):  # (DST d/h.txt itself is entered, as cp -r)
        rc, res, err = daemon.transfer(daemon.url("/h.txt"), target, check=False)
        assert rc == 1, (target, err)
        assert "a folder of that name exists" in res["error"], res
        assert files_under(dst) == ["h.txt"], target
    # a file inside a folder being downloaded: the same, nothing of the folder written
    (dst / "dir" / "b.txt").mkdir(parents=True)
    rc, res, err = daemon.transfer(daemon.url("/dir"), str(dst) + "/", check=False)
    assert rc == 1, err
    assert "b.txt: a folder of that name exists" in res["error"], res
    assert files_under(dst) == ["dir", "dir/b.txt", "h.txt"]


# -- 6: two sources never land on one name ------------------------------------------------------------
def test_same_named_sources_are_refused_before_sending(daemon: Daemon, tmp_path: Path) -> None:
    a = make_file(tmp_path / "a" / "x.txt", 1000, seed=1)
    b = make_file(tmp_path / "b" / "x.txt", 1000, seed=2)
    rc, res, err = daemon.transfer(str(a), str(b), daemon.url("/d/"), check=False)
    assert rc == 2, err
    assert str(a) in res["error"] and str(b) in res["error"], res
    assert not (daemon.docroots["alice"] / "d").exists()
    rc, res, err = daemon.transfer(str(a), str(a), daemon.url("/d/"), check=False)
    assert rc == 2 and "given twice" in res["error"], res
    # a folder and a file of one name collide too; --src-base keeps them apart
    make_file(tmp_path / "c" / "x.txt" / "inner", 10)
    rc, res, _ = daemon.transfer(str(a), str(tmp_path / "c" / "x.txt"), daemon.url("/d/"),
                                 check=False)
    assert rc == 2, res
    rc, res, _ = daemon.transfer(str(a), str(b), daemon.url("/d/"), "--src-base", str(tmp_path))
    assert rc == 0 and res["files"] == 2, res
    assert sha256(daemon.docroots["alice"] / "d" / "a" / "x.txt") == sha256(a)
    # downloads: two remote files of one name into one folder
    out = tmp_path / "out"
    out.mkdir()
    rc, res, err = daemon.transfer(daemon.url("/d/a/x.txt"), daemon.url("/d/b/x.txt"),
                                   str(out), check=False)
    assert rc == 2, err
    assert "/d/a/x.txt" in res["error"] and "/d/b/x.txt" in res["error"], res
    assert files_under(out) == []


# -- 7: decrypt FILE - writes to standard output ------------------------------------------------------
def test_decrypt_and_encrypt_to_standard_output(tmp_path: Path) -> None:
    src = make_file(tmp_path / "r.bin", 300_000)
    env = base_env(tmp_path, FALLBACK_FILEPASS="Correct-Horse-9")
    p = run(fb("encrypt", str(src)), env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    envelope = tmp_path / "r.bin.fallback-env"
    p = subprocess.run(fb("decrypt", str(envelope), "-"), capture_output=True, env=env,
                       cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == src.read_bytes()
    assert not (tmp_path / "-").exists()
    p = subprocess.run(fb("encrypt", str(src), "-"), capture_output=True, env=env,
                       cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "-").exists()
    (tmp_path / "again.fallback-env").write_bytes(p.stdout)
    p = run(fb("decrypt", str(tmp_path / "again.fallback-env")), env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sha256(tmp_path / "again") == sha256(src)
    # a wrong passphrase: exit 1, nothing on standard output
    p = subprocess.run(fb("decrypt", str(envelope), "-"), capture_output=True,
                       env={**env, "FALLBACK_FILEPASS": "wrong-passphrase"}, cwd=tmp_path,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 1 and p.stdout == b"", p.stderr
    p = run(fb("decrypt", "", "-"), env, cwd=tmp_path)
    assert p.returncode == 2, p.stderr


# -- 8: an error names its path once ------------------------------------------------------------------
def test_an_error_among_several_sources_names_the_path_once(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    make_file(tmp_path / "ok.txt", 100)
    env = base_env(tmp_path, password=PASSWORDS["alice"])
    p = run(fb("transfer", "ok.txt", "nope.txt", daemon.url("/in/"), "--json", "-q",
               "--fingerprint", daemon.fingerprint), env, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    error = last_json(p.stdout)["error"]
    assert error.count("nope.txt") == 1, error
    # a URL source keeps its (redacted) URL before the daemon's "remote PATH: not found"
    p = run(fb("transfer", daemon.url("/in/ok.txt"), daemon.url("/in/gone.txt"),
               str(tmp_path / "back"), "--json", "-q", "--fingerprint", daemon.fingerprint),
            env, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert last_json(p.stdout)["error"] == f"{daemon.url('/in/gone.txt')}: remote /in/gone.txt: " \
        "not found"


# -- 9: a malformed --proxy is a usage error ----------------------------------------------------------
def test_a_malformed_proxy_is_a_usage_error(tmp_path: Path) -> None:
    src = make_file(tmp_path / "h.txt", 10)
    env = base_env(tmp_path, password="x")
    url = f"https://alice@127.0.0.1:{free_port()}/in/"
    for proxy in ("garbage url", "ftp://proxy:21", "http://:8080"):
        p = run(fb("transfer", str(src), url, "--proxy", proxy, "--json"), env)
        assert p.returncode == 2, (proxy, p.stderr)
        assert "bad proxy URL" in last_json(p.stdout)["error"]
    with pytest.raises(UsageError, match="^proxy: bad proxy URL"):
        transfer(str(src), url, proxy="garbage url")

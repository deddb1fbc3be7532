"""Refusals: every one is a clear message and an exit code, never a traceback.

A real daemon (users alice and bob, each confined to his own docroot) is asked
to do what it must not: wrong credentials, ``..``, paths that look absolute,
symlinks out of the docroot, broken configs, bad URLs, untrusted TLS. After
each group of refusals the daemon must still be alive and serving, and its log
must hold exactly one formatted line per refusal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fallback.cli import main
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from tests.statefiles import kept_below

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO|WARNING|ERROR) ")
OUTSIDE = "refused, it leads outside the docroot"
DOTDOT = "('..' is not allowed)"
WRONG = "wrong user name or password"

Run = tuple[int, str, str]  # exit code, stdout, stderr


# -- helpers --------------------------------------------------------------------------------------
def fallback_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fallback", *args]


def run_all(cmds: Sequence[Sequence[str]], password: str | None = None,
            cwd: Path | None = None) -> list[Run]:
    """Run commands as real processes, concurrently; results in order."""
    env = {**os.environ}
    env.pop("FALLBACK_PASSWORD", None)
    if password is not None:
        env["FALLBACK_PASSWORD"] = password
    procs = [subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=cwd) for c in cmds]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append((p.returncode, stdout, stderr))
    return out


def run1(cmd: Sequence[str], password: str | None = None) -> Run:
    return run_all([cmd], password)[0]


def cli(cmd: Sequence[str], password: str | None = None) -> Run:
    """The same CLI entry point in this process (a process start costs ~0.5 s of CPU; the
    refusal matrix below has dozens). An exception escaping ``main`` fails the test with
    its traceback, which is what a subprocess would have printed on stderr."""
    assert list(cmd[:3]) == fallback_cmd()[:3]
    saved = os.environ.pop("FALLBACK_PASSWORD", None)
    if password is not None:
        os.environ["FALLBACK_PASSWORD"] = password
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(cmd[3:]))
            except SystemExit as exc:  # argparse
                rc = int(exc.code or 0)
    finally:
        os.environ.pop("FALLBACK_PASSWORD", None)
        if saved is not None:
            os.environ["FALLBACK_PASSWORD"] = saved
    return rc, out.getvalue(), err.getvalue()


def mixed(cmds: Sequence[Sequence[str]], password: str | None = None) -> list[Run]:
    """The first command as a real process (its stderr is what a user sees), the rest in-process."""
    return [run1(cmds[0], password), *(cli(c, password) for c in cmds[1:])]


def assert_refused(run: Run, *needles: str, code: int = 1) -> str:
    """Exit ``code``; stderr is exactly one ``error:`` line holding every needle."""
    rc, _, err = run
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == code, f"rc={rc} stderr={err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def http_url(d: Daemon, path: str, user: str = "alice") -> str:
    return d.url(path, user=user, scheme="http")


def transfer_cmd(src: str, dst: str, *opts: str) -> list[str]:
    return fallback_cmd("transfer", src, dst, "-q", *opts)


def log_mark(d: Daemon) -> int:
    return len(d.log())


def log_since(d: Daemon, mark: int) -> list[str]:
    return d.log()[mark:].splitlines()


def assert_log_clean(lines: list[str]) -> None:
    """Every line is one formatted record: no traceback, no stray output."""
    assert not any("Traceback" in ln for ln in lines), "\n".join(lines)
    bad = [ln for ln in lines if not LOG_LINE.match(ln)]
    assert not bad, "\n".join(bad)


def count(lines: list[str], needle: str) -> int:
    return sum(needle in ln for ln in lines)


def assert_alive(d: Daemon, tmp: Path) -> None:
    """The daemon still runs and a good transfer works afterwards."""
    assert d.proc is not None and d.proc.poll() is None
    f = make_file(tmp / f"alive-{uuid.uuid4().hex[:8]}.bin", 70_000, seed=7)
    rc, out, err = cli(transfer_cmd(str(f), http_url(d, "/alive/"), "--transport", "http"),
                       PASSWORDS["alice"])
    assert rc == 0, err
    assert sha256(d.docroots["alice"] / "alive" / f.name) == sha256(f)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root (symlinks not followed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path, root: Path | None = None) -> list[str]:
    """Hidden files below ``folder``, and the partials and journals of targets below it kept in
    the state folder of ``root`` (the tree's top: the docroot, or a download's destination)."""
    if not folder.exists():
        return []
    hidden = sorted(rel for p in folder.rglob(".*")
                    if (rel := p.relative_to(folder).as_posix()).split("/")[0] != ".fallback")
    return hidden + kept_below(root or folder, folder)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module; alice's docroot holds symlinks leading out of it."""
    b = tmp_path_factory.mktemp("refusals")
    d = Daemon(b, free_port(), free_port(), {u: b / "docroot" / u for u in ("alice", "bob")})
    d.start()
    alice, bob = d.docroots["alice"], d.docroots["bob"]
    make_file(alice / "f.bin", 300_000, seed=1)
    (bob / "secret.txt").write_text("bob's secret\n")
    (alice / "etc-link").symlink_to("/etc")
    (alice / "passwd-link").symlink_to("/etc/passwd")
    (alice / "bob-link").symlink_to(bob)
    (alice / "bobfile-link").symlink_to(bob / "secret.txt")
    tree = alice / "tree"
    make_file(tree / "real" / "a.bin", 5000, seed=2)
    make_file(tree / "top.bin", 3000, seed=3)
    (tree / "to-bob").symlink_to(bob)
    (tree / "to-etc").symlink_to("/etc")
    (tree / "passwd").symlink_to("/etc/passwd")
    (tree / "inside-dir").symlink_to(tree / "real")
    yield d
    assert d.stop() == 0


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


# -- credentials ----------------------------------------------------------------------------------
def test_wrong_password_and_unknown_user(srv: Daemon, work: Path) -> None:
    src = make_file(work / "up.bin", 10_000)
    mark = log_mark(srv)
    runs = mixed([
        transfer_cmd(str(src), http_url(srv, "/cred/"), "--transport", "http"),
        transfer_cmd(http_url(srv, "/f.bin"), str(work / "down.bin"), "--transport", "http"),
        transfer_cmd(str(src), http_url(srv, "/cred/", user="mallory"), "--transport", "http"),
        transfer_cmd(http_url(srv, "/f.bin", user="mallory"), str(work / "down2.bin"),
                     "--transport", "http"),
    ], password="not-the-password")
    for r in runs:
        assert_refused(r, WRONG, code=3)  # exit 3: the daemon refused the credentials
    # nothing written on either side, not even a partial
    assert not (srv.docroots["alice"] / "cred").exists()
    assert not (work / "down.bin").exists() and not (work / "down2.bin").exists()
    assert leftovers(work) == []
    # bob's password is not alice's
    assert_refused(cli(transfer_cmd(http_url(srv, "/f.bin"), str(work / "d3.bin"),
                                     "--transport", "http"), PASSWORDS["bob"]), WRONG, code=3)
    lines = log_since(srv, mark)
    assert_log_clean(lines)
    assert count(lines, WRONG) == 5
    assert_alive(srv, work)


# -- confinement ----------------------------------------------------------------------------------
def test_dotdot_is_refused_for_transfers_and_plain_http(srv: Daemon, work: Path) -> None:
    alice_before = tree_digest(srv.docroots["alice"])
    src = make_file(work / "evil.bin", 4000)
    mark = log_mark(srv)
    bob = PASSWORDS["bob"]
    runs = mixed([
        transfer_cmd(http_url(srv, "/../alice/f.bin", user="bob"), str(work / "stolen.bin"),
                     "--transport", "http"),
        transfer_cmd(str(src), http_url(srv, "/../alice/", user="bob"), "--transport", "http"),
        transfer_cmd(str(src), http_url(srv, "/sub/../../alice/evil.bin", user="bob"),
                     "--transport", "http"),
        transfer_cmd(http_url(srv, "/%2e%2e/alice/f.bin", user="bob"), str(work / "s2.bin"),
                     "--transport", "http"),
    ], password=bob)
    assert_refused(runs[0], "path '/../alice/f.bin' escapes the docroot", DOTDOT)
    assert_refused(runs[1], "path '/../alice/' escapes the docroot", DOTDOT)
    assert_refused(runs[2], DOTDOT)
    assert_refused(runs[3], "path '/../alice/f.bin'", DOTDOT)
    assert not (work / "stolen.bin").exists() and not (work / "s2.bin").exists()
    # plain clients: curl normalises '..' away unless told not to
    curl = ["curl", "-s", "--path-as-is", "-u", f"bob:{bob}", "-w", "\n%{http_code}"]
    get = subprocess.run([*curl, f"http://127.0.0.1:{srv.http_port}/../alice/f.bin"],
                         capture_output=True, text=True, check=True).stdout
    put = subprocess.run([*curl, "-T", str(src),
                          f"http://127.0.0.1:{srv.http_port}/../alice/evil.bin"],
                         capture_output=True, text=True, check=True).stdout
    assert get == f'{{"error": "path \'../alice/f.bin\' escapes the docroot {DOTDOT}"}}\n403'
    assert put == f'{{"error": "path \'../alice/evil.bin\' escapes the docroot {DOTDOT}"}}\n403'
    assert tree_digest(srv.docroots["alice"]) == alice_before
    lines = log_since(srv, mark)
    assert_log_clean(lines)
    assert count(lines, DOTDOT) == 6
    assert_alive(srv, work)


def test_absolute_looking_paths_stay_in_own_docroot(srv: Daemon, work: Path) -> None:
    alice_root = srv.docroots["alice"]
    bob_root = srv.docroots["bob"]
    alice_before = tree_digest(alice_root)
    src = make_file(work / "abs.bin", 6000, seed=4)
    bob = PASSWORDS["bob"]
    runs = mixed([
        # alice's file by its absolute path, and by its name: neither is in bob's docroot
        transfer_cmd(http_url(srv, f"/{alice_root}/f.bin", user="bob"), str(work / "a.bin"),
                     "--transport", "http"),
        transfer_cmd(http_url(srv, "/f.bin", user="bob"), str(work / "b.bin"),
                     "--transport", "http"),
        transfer_cmd(http_url(srv, "//etc/passwd", user="bob"), str(work / "c.bin"),
                     "--transport", "http"),
    ], password=bob)
    assert_refused(runs[0], "f.bin: not found")
    assert_refused(runs[1], "remote /f.bin: not found")
    assert_refused(runs[2], "passwd: not found")
    assert not any((work / n).exists() for n in ("a.bin", "b.bin", "c.bin"))
    # an upload to alice's absolute docroot path lands under bob's own docroot
    rc, _, err = cli(transfer_cmd(str(src), http_url(srv, f"{alice_root}/", user="bob"),
                                   "--transport", "http"), bob)
    assert rc == 0, err
    landed = bob_root / str(alice_root).lstrip("/") / "abs.bin"
    assert sha256(landed) == sha256(src)
    assert tree_digest(alice_root) == alice_before
    # plain GET of an absolute-looking path: 404 inside bob's docroot, not /etc/passwd
    out = subprocess.run(["curl", "-s", "-u", f"bob:{bob}", "-w", "\n%{http_code}",
                          f"http://127.0.0.1:{srv.http_port}//etc/passwd"],
                         capture_output=True, text=True, check=True).stdout
    assert out == '{"error": "/etc/passwd: no such file"}\n404'
    assert_alive(srv, work)


def test_symlinks_out_of_docroot_refused_for_transfers(srv: Daemon, work: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    src = make_file(work / f"probe-{tag}.bin", 5000, seed=5)
    bob_before = tree_digest(srv.docroots["bob"])
    passwd_before = sha256(Path("/etc/passwd"))
    mark = log_mark(srv)
    t = ("--transport", "http")
    downloads = [("/etc-link/passwd", "/etc-link/passwd"), ("/passwd-link", "/passwd-link"),
                 ("/bob-link/secret.txt", "/bob-link/secret.txt"),
                 ("/bobfile-link", "/bobfile-link"), ("/bob-link", "/bob-link"),
                 ("/etc-link", "/etc-link")]
    uploads = [("/etc-link/", "/etc-link"), ("/bob-link/", "/bob-link"),
               ("/bob-link/deeper/", "/bob-link/deeper"), ("/passwd-link", "/passwd-link"),
               ("/bobfile-link", "/bobfile-link")]
    runs = mixed(
        [transfer_cmd(http_url(srv, p), str(work / f"dl{i}"), *t)
         for i, (p, _) in enumerate(downloads)]
        + [transfer_cmd(str(src), http_url(srv, p), *t) for p, _ in uploads],
        password=PASSWORDS["alice"])
    for r, (_, shown) in zip(runs, downloads + uploads, strict=True):
        assert_refused(r, f"error: remote {shown}: {OUTSIDE}")
    try:
        assert not Path(f"/etc/{src.name}").exists()
        assert not (srv.docroots["bob"] / src.name).exists()
    finally:
        Path(f"/etc/{src.name}").unlink(missing_ok=True)
    assert tree_digest(srv.docroots["bob"]) == bob_before
    assert sha256(Path("/etc/passwd")) == passwd_before
    assert not any((work / f"dl{i}").exists() for i in range(len(downloads)))
    lines = log_since(srv, mark)
    assert_log_clean(lines)
    assert count(lines, OUTSIDE) == len(downloads) + len(uploads)
    assert_alive(srv, work)


def test_symlinks_out_of_docroot_refused_for_plain_get_and_put(srv: Daemon, work: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    body = work / "body.txt"
    body.write_text("must not land outside\n")
    bob_before = tree_digest(srv.docroots["bob"])
    mark = log_mark(srv)
    base = f"http://127.0.0.1:{srv.http_port}"
    curl = ["curl", "-s", "-u", f"alice:{PASSWORDS['alice']}", "-w", "\n%{http_code}"]
    cases = [
        (["GET"], "/etc-link/passwd"), (["GET"], "/passwd-link"),
        (["GET"], "/bob-link/secret.txt"), (["GET"], "/bobfile-link"),
        (["PUT"], f"/etc-link/{tag}"), (["PUT"], f"/bob-link/{tag}"),
        (["PUT"], "/passwd-link"), (["PUT"], "/bobfile-link"),
    ]
    try:
        for (method,), path in cases:
            extra = ["-T", str(body)] if method == "PUT" else []
            out = subprocess.run([*curl, *extra, base + path], capture_output=True, text=True,
                                 check=True).stdout
            assert out == f'{{"error": "{path}: {OUTSIDE}"}}\n403', (method, path, out)
        assert not Path(f"/etc/{tag}").exists()
    finally:
        Path(f"/etc/{tag}").unlink(missing_ok=True)
    assert tree_digest(srv.docroots["bob"]) == bob_before
    assert (srv.docroots["bob"] / "secret.txt").read_text() == "bob's secret\n"
    lines = log_since(srv, mark)
    assert_log_clean(lines)
    assert count(lines, OUTSIDE) == len(cases)
    assert_alive(srv, work)


def test_downloaded_tree_skips_symlinked_folders(srv: Daemon, work: Path) -> None:
    dst = work / "got"
    rc, out, err = cli(transfer_cmd(http_url(srv, "/tree"), str(dst), "--transport", "http",
                                     "--json"), PASSWORDS["alice"])
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] and res["files"] == 2
    tree = srv.docroots["alice"] / "tree"
    got = tree_digest(dst)
    assert got == {"real/a.bin": tree_digest(tree)["real/a.bin"],
                   "top.bin": tree_digest(tree)["top.bin"]}
    # nothing from bob's docroot or /etc came along, not even as an empty folder
    assert sorted(p.name for p in dst.iterdir()) == ["real", "top.bin"]
    assert sha256(dst / "real" / "a.bin") == sha256(tree / "real" / "a.bin")


# -- configs --------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "malformed": ('<CONF version="2">\n<http_server>\n<http_port>8080\n</http_server>\n</CONF>\n',
                  [r"malformed\.xml:4: malformed XML: mismatched tag \(column 3\)"]),
    "unknown": ('<?xml version="1.0"?>\n<CONF version="2">\n  <http_server>\n'
                '    <http_prot>8080</http_prot>\n  </http_server>\n  <bogus/>\n</CONF>\n',
                [r"unknown\.xml:4: unknown element <http_prot> in <http_server>; "
                 r"did you mean <http_port>\?",
                 r"unknown\.xml:6: unknown element <bogus> in <CONF>"]),
    "badport": ('<CONF version="2">\n<http_server>\n<http_port>70000</http_port>\n'
                '<https_port>80a</https_port>\n</http_server>\n</CONF>\n',
                [r"badport\.xml:3: http_port: 70000 is out of range 1-65535",
                 r'badport\.xml:4: https_port: "80a" is not an integer']),
}


def test_bad_configs_exit_2_with_file_line_messages(srv: Daemon, work: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name, (text, _) in BAD_CONFIGS.items():
        (work / f"{name}.xml").write_text(text)
    names = list(BAD_CONFIGS)
    # `serve` as real processes (a config that loaded by mistake would start serving)
    runs = run_all([fallback_cmd("serve", "--config", f"{n}.xml") for n in names]
                   + [fallback_cmd("serve", "--config", "missing.xml")], cwd=work)
    monkeypatch.chdir(work)
    runs[len(names):len(names)] = [cli(fallback_cmd("config", "validate", f"{n}.xml"))
                                   for n in names]
    runs.append(cli(fallback_cmd("config", "validate", str(srv.config_path))))
    for i, n in enumerate(names * 2):
        rc, out, err = runs[i]
        assert rc == 2, (n, err)
        assert out == "" and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == len(BAD_CONFIGS[n][1]), lines
        for line, pattern in zip(lines, BAD_CONFIGS[n][1], strict=True):
            assert re.fullmatch(pattern, line), (line, pattern)
    rc, out, err = runs[-2]
    assert (rc, out) == (2, "")
    assert err.strip() == "missing.xml:0: cannot read: No such file or directory"
    rc, out, err = runs[-1]
    assert rc == 0 and err == ""
    assert f"http_server.http_port = {srv.http_port}   ({srv.config_path}:" in out
    assert f"users.user[bob].docroot = {srv.docroots['bob']}" in out
    assert "password_hash = <set>" in out and "$argon2id$" not in out


def test_unusable_tls_certificate_exits_2(work: Path) -> None:
    (work / "docroot").mkdir()
    (work / "cert.pem").write_text("not a certificate\n")
    (work / "key.pem").write_text("not a key\n")
    port = free_port()
    (work / "c.xml").write_text(
        f'<CONF version="2"><server><state_dir>state</state_dir></server>'
        f"<http_server><http_port>{port}</http_port><https_port>{free_port()}</https_port>"
        "<enable_http>true</enable_http><bind_address>127.0.0.1</bind_address>"
        "<cert_file>cert.pem</cert_file><key_file>key.pem</key_file></http_server>"
        "<file_system><docroot>docroot</docroot></file_system></CONF>")
    rc, out, err = run1(fallback_cmd("serve", "--config", str(work / "c.xml")))
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # at its FILE:LINE, as config validate says it
    assert lines[0].startswith(f"{work / 'c.xml'}:1: cert_file: cannot use {work / 'cert.pem'} "
                               f"with key_file {work / 'key.pem'}: "), err
    assert "Unable to load PEM file" in lines[0]
    assert not (work / "state").exists() or not list((work / "state").glob("*.pem"))


# -- usage ----------------------------------------------------------------------------------------
def test_usage_errors_exit_2(srv: Daemon, work: Path) -> None:
    f = make_file(work / "u.bin", 100)
    good = http_url(srv, "/u/")
    cases = [
        (transfer_cmd(str(f), "http://127.0.0.1:99999/x"),
         "error: bad URL 'http://127.0.0.1:99999/x': Port out of range 0-65535"),
        (transfer_cmd(str(f), "http:///x"),
         "error: bad URL 'http:///x': expected http(s)://[user@]host[:port]/path"),
        (transfer_cmd(str(f), "ftp://alice@127.0.0.1/x"),
         "error: bad URL 'ftp://alice@127.0.0.1/x': expected http(s)://[user@]host[:port]/path"),
        (transfer_cmd(str(f), str(work / "elsewhere")),
         "error: neither end is a URL: one end must be http(s)://[user@]host[:port]/path"),
        (transfer_cmd(good, http_url(srv, "/v/")),
         "error: both ends are URLs: one end must be a local path"),
        (transfer_cmd(str(f), f"http://127.0.0.1:{srv.http_port}/u/"),
         "error: no user name: put it in the URL (https://USER@host/...) or use --user"),
        (transfer_cmd(str(f), good, "--fingerprint", "zz"),
         "error: invalid fingerprint: expected hexadecimal digits (e.g. 'abcd...')"),
        (transfer_cmd(str(f), good, "--fingerprint", srv.fingerprint, "--insecure"),
         "error: --cacert, --fingerprint and --insecure are mutually exclusive: give one"),
        (transfer_cmd(str(f), good, "--cacert", str(work / "nope.pem")),
         f"error: --cacert {work / 'nope.pem'}: cannot load CA certificate: "
         "No such file or directory"),
        (transfer_cmd(str(f), good, "--block-size", "1000"),
         "error: --block-size 1000: must be between 4K and 64M"),
        (transfer_cmd(str(f), good, "--streams", "0"),
         "error: --streams must be between 1 and 64"),
    ]
    mark = log_mark(srv)
    runs = mixed([c for c, _ in cases], password=PASSWORDS["alice"])
    for (cmd, expected), (rc, out, err) in zip(cases, runs, strict=True):
        assert rc == 2, (cmd, err)
        assert err.strip().splitlines() == [expected], cmd
        assert out == ""
    assert not (srv.docroots["alice"] / "u").exists()
    assert not (work / "elsewhere").exists()
    # nothing reached the daemon
    assert count(log_since(srv, mark), "session") == 0
    # argparse's own usage errors are exit 2 too
    rc, _, err = cli(fallback_cmd("transfer", str(f)))
    assert rc == 2 and "error: give SRC... DST (or --file-list FILE DST)" in err


# -- TLS ------------------------------------------------------------------------------------------
def test_tls_verification(srv: Daemon, work: Path) -> None:
    f = make_file(work / "tls.bin", 200_000, seed=8)
    url = srv.url("/tls/")  # https on the https port
    cert = srv.base / "state" / "cert.pem"
    wrong_fp = ":".join(["AB"] * 32)
    runs = mixed([
        transfer_cmd(str(f), url, "--fingerprint", wrong_fp),
        transfer_cmd(str(f), url),
        transfer_cmd(str(f), srv.url("/tls-http/", scheme="http"), "--transport", "https"),
        transfer_cmd(str(f), url + "c/", "--cacert", str(cert)),
    ], password=PASSWORDS["alice"])
    # not -q, and a real process: the warning is what the user's terminal shows
    runs.append(run1(fallback_cmd("transfer", str(f), url + "i/", "--insecure"),
                     PASSWORDS["alice"]))
    assert_refused(runs[0], "TLS certificate does not match --fingerprint")
    for r in runs[1:3]:
        assert_refused(r, "TLS certificate not trusted", "certificate verify failed",
                       "self-signed certificate")
    tls_dir = srv.docroots["alice"] / "tls"
    assert not (tls_dir / "tls.bin").exists()
    assert not (srv.docroots["alice"] / "tls-http").exists()
    rc, _, err = runs[3]
    assert rc == 0 and err == ""
    assert sha256(tls_dir / "c" / "tls.bin") == sha256(f)
    rc, out, err = runs[4]
    assert rc == 0, err
    assert sha256(tls_dir / "i" / "tls.bin") == sha256(f)
    assert "Traceback" not in err and "Warning:" not in err
    assert err.count("warning: --insecure: the server certificate is not verified") == 1
    assert re.search(r"upload ok: 1 file, 200.0 kB .* MB/s over https", out)
    assert leftovers(tls_dir, srv.docroots["alice"]) == []

"""The CLI as scp, curl, ssh and ascp users expect it (issue 14).

Trust on first use on a real pseudo-terminal, fingerprints as the daemon prints
them, certificates that name the host, passwords from a prompt, ~/.netrc and a
file, http:// meaning HTTP, --version, --help, -v, exit codes, JSON on usage
errors, decrypt refusing to overwrite, `serve` overrides and default config,
the access log. Real daemons, real processes, real TLS; the terminal is a pty.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509

from fallback import tls
from fallback.tls import fingerprint, parse_fingerprint
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256

FP = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


# -- helpers --------------------------------------------------------------------------------------
def fb(*args: str) -> list[str]:
    return [sys.executable, "-m", "fallback", *args]


def base_env(tmp: Path, password: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user with an empty config folder and home (no known_hosts, no
    .netrc), with FALLBACK_PASSWORD only when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("FALLBACK_PASSWORD", "FALLBACK_FILEPASS")}
    (tmp / "home").mkdir(exist_ok=True)
    env.update(FALLBACK_CONFIG_DIR=str(tmp / "config"), HOME=str(tmp / "home"))
    if password is not None:
        env["FALLBACK_PASSWORD"] = password
    env.update(extra)
    return env


def run(args: Sequence[str], env: dict[str, str], timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def last_json(out: str) -> dict:
    lines = out.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


class Terminal:
    """A process on a real pseudo-terminal (stdin, stdout and stderr are its slave side)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], columns: int = 120) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.execve(argv[0], list(argv), env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.out = ""
        self.code: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            return False
        self.out += data.decode(errors="replace")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out)
            if m:
                return m
            assert time.monotonic() < deadline, f"timed out waiting for {pattern!r}:\n{self.out}"
            if not self._read(0.1):
                m = re.search(pattern, self.out)
                assert m, f"process ended before {pattern!r}:\n{self.out}"
                return m

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.1):
            assert time.monotonic() < deadline, f"still running:\n{self.out}"
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    b = tmp_path_factory.mktemp("ux")
    d = Daemon(b, free_port(), free_port(), {u: b / "docroot" / u for u in ("alice", "bob")})
    d.start()
    make_file(d.docroots["alice"] / "f.bin", 300_000, seed=41)
    yield d
    assert d.stop() == 0


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return make_file(tmp_path / "small.bin", 120_000, seed=42)


# -- trust ----------------------------------------------------------------------------------------
def test_fingerprint_accepts_the_form_the_daemon_prints(srv: Daemon, small: Path,
                                                        tmp_path: Path) -> None:
    fp = srv.fingerprint
    raw = bytes.fromhex(fp.replace(":", ""))
    for form in (f"SHA256 {fp}", f"sha256 {fp.lower()}", f"SHA256 {raw.hex()}", fp,
                 f"sha256:{raw.hex().upper()}"):
        assert parse_fingerprint(form) == raw, form
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = run(fb("transfer", str(small), srv.url("/fp/"), "--fingerprint", f"SHA256 {fp}",
               "--json", "-q"), env)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["transports"] == ["https"]
    assert sha256(srv.docroots["alice"] / "fp" / small.name) == sha256(small)


def test_untrusted_certificate_shows_its_fingerprint_and_how_to_trust_it(
        srv: Daemon, small: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = run(fb("transfer", str(small), srv.url("/untrusted/"), "--json"), env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    err = p.stderr
    assert f"SHA256 {srv.fingerprint}" in err  # what the daemon printed, to compare
    assert f"--fingerprint 'SHA256 {srv.fingerprint}'" in err
    assert "--cacert FILE" in err and "--insecure" in err
    assert "(yes/no)" not in err  # not a terminal: no question
    assert err.strip().splitlines()[-1].startswith("error: TLS certificate not trusted: ")
    res = last_json(p.stdout)
    assert res["ok"] is False and srv.fingerprint in res["error"]
    assert not (tmp_path / "config" / "known_hosts").exists()
    assert not (srv.docroots["alice"] / "untrusted").exists()
    # -q: the one error line, still with the fingerprint
    q = run(fb("transfer", str(small), srv.url("/untrusted/"), "-q"), env)
    assert q.returncode == 1
    assert q.stderr.strip().splitlines() == [
        next(ln for ln in err.splitlines() if ln.startswith("error: "))]


def test_trust_on_first_use_on_a_terminal_then_a_changed_certificate_is_refused(
        daemon_factory, small: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory()
    env = base_env(tmp_path, PASSWORDS["alice"])
    known_hosts = tmp_path / "config" / "known_hosts"
    key = f"127.0.0.1:{d.https_port}"

    # "no": nothing is remembered, nothing moves
    t = Terminal(fb("transfer", str(small), d.url("/no/")), env)
    t.expect(r"\(yes/no\) ")
    t.send("no\n")
    assert t.wait() == 1
    assert f"SHA256 {d.fingerprint}" in t.out and "error: TLS certificate not trusted" in t.out
    assert not known_hosts.exists() and not (d.docroots["alice"] / "no").exists()

    # "yes": remembered (0600 file in a 0700 folder), and this very command goes on
    t = Terminal(fb("transfer", str(small), d.url("/tofu/")), env)
    t.expect(rf"Trust this certificate and remember it for {re.escape(key)}\? \(yes/no\) ")
    t.send("yes\n")
    assert t.wait() == 0, t.out
    assert sha256(d.docroots["alice"] / "tofu" / small.name) == sha256(small)
    lines = [ln for ln in known_hosts.read_text().splitlines() if not ln.startswith("#")]
    assert lines == [f"{key} SHA256 {d.fingerprint}"]
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    assert known_hosts.parent.stat().st_mode & 0o777 == 0o700
    assert f"remembered in {known_hosts}:2" in t.out

    # later commands, not on a terminal, need no option
    p = run(fb("transfer", str(small), d.url("/later/"), "--json", "-q"), env)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["transports"] == ["https"]

    # the daemon's certificate is replaced: a loud refusal with both fingerprints and the line
    old = d.fingerprint
    d.stop()
    for name in ("cert.pem", "key.pem"):
        (d.base / "state" / name).unlink()
    d.start()
    assert d.fingerprint != old
    for attempt in ("plain", "terminal"):
        if attempt == "plain":
            p = run(fb("transfer", str(small), d.url("/changed/"), "--json"), env)
            code, err = p.returncode, p.stderr
            assert last_json(p.stdout)["ok"] is False
        else:  # no "trust it?" question either: the user must edit the file
            t = Terminal(fb("transfer", str(small), d.url("/changed/")), env)
            code, err = t.wait(), t.out
            assert "(yes/no)" not in err
        assert code == 1
        assert "CERTIFICATE HAS CHANGED" in err
        assert f"remembered: SHA256 {old}" in err and f"presented:  SHA256 {d.fingerprint}" in err
        assert f"delete line 2 of {known_hosts}" in err
        assert (f"error: TLS certificate of {key} does not match the one remembered in "
                f"{known_hosts}:2") in err
    assert not (d.docroots["alice"] / "changed").exists()
    # an explicit --fingerprint still works for one command, and the file is untouched
    p = run(fb("transfer", str(small), d.url("/pinned/"), "--fingerprint", d.fingerprint, "-q"),
            env)
    assert p.returncode == 0, p.stderr
    assert old in known_hosts.read_text() and d.fingerprint not in known_hosts.read_text()


def test_generated_certificate_names_the_host_and_cert_names(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory(start=False)
    d.write_config()
    text = d.config_path.read_text().replace(
        "<bind_address>127.0.0.1</bind_address>",
        "<bind_address>127.0.0.1</bind_address>"
        "<cert_names>xfer.example.org, *.files.example.org 192.0.2.7</cert_names>")
    d.config_path.write_text(text)
    lines = _start_lines(d)
    cert = d.base / "state" / "cert.pem"
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    want_dns, want_ips = tls.host_names("127.0.0.1", ())
    assert socket.gethostname().lower() in dns and socket.getfqdn().lower().rstrip(".") in dns
    assert set(want_dns) <= set(dns) and set(want_ips) <= set(ips)
    assert {"xfer.example.org", "*.files.example.org"} <= set(dns) and "192.0.2.7" in ips
    assert any(ln.startswith(f"clients verify it with --cacert {cert} (names: localhost, ")
               for ln in lines), lines
    fp1 = d.fingerprint
    # cert_names change: a new certificate that covers the new name
    d.stop()
    d.config_path.write_text(text.replace("192.0.2.7", "198.51.100.9"))
    d.start()
    assert d.fingerprint != fp1 and fingerprint(cert) == d.fingerprint
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    ips = [str(i) for i in c.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)]
    assert "198.51.100.9" in ips
    # no change: the same certificate (fingerprints stay stable across restarts)
    d.stop()
    d.start()
    assert fingerprint(cert) == d.fingerprint
    # a bad entry is a FILE:LINE problem
    d.config_path.write_text(text.replace("192.0.2.7", "not_a_name!"))
    p = subprocess.run(fb("config", "validate", str(d.config_path)), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert re.fullmatch(rf"{re.escape(str(d.config_path))}:\d+: cert_names: \"not_a_name!\" is "
                        r"not an IP address or hostname", p.stderr.strip()), p.stderr


def _start_lines(d: Daemon) -> list[str]:
    """Start ``d`` and return its start-up lines (stdout up to "ready")."""
    for root in d.docroots.values():
        root.mkdir(parents=True, exist_ok=True)
    log = open(d.log_path, "a")
    d.proc = subprocess.Popen(fb("serve", "--config", str(d.config_path)), stdout=subprocess.PIPE,
                              stderr=log, text=True, cwd=d.base)
    assert d.proc.stdout is not None
    lines: list[str] = []
    while (line := d.proc.stdout.readline()) and line.strip() != "ready":
        lines.append(line.rstrip("\n"))
        if "fingerprint SHA256" in line:
            d.fingerprint = line.rsplit(" ", 1)[1].strip()
    assert line, d.log()
    return lines


def test_host_names_cover_a_specific_bind_address() -> None:
    dns, ips = tls.host_names("192.0.2.44", ["[2001:db8::5]", "Files.Example.org."])
    assert dns[0] == "localhost" and ips[:2] == ["127.0.0.1", "::1"]
    assert "192.0.2.44" in ips and "2001:db8::5" in ips and "files.example.org" in dns
    assert "0.0.0.0" not in tls.host_names("0.0.0.0")[1]


# -- credentials ----------------------------------------------------------------------------------
def test_password_prompt_on_a_terminal(srv: Daemon, small: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path)  # no FALLBACK_PASSWORD
    t = Terminal(fb("transfer", str(small), srv.url("/prompted/", scheme="http"),
                    "--transport", "http"), env)
    t.expect(r"alice@127\.0\.0\.1's password: ")
    t.send(PASSWORDS["alice"] + "\n")
    assert t.wait() == 0, t.out
    assert PASSWORDS["alice"] not in t.out  # getpass does not echo
    assert sha256(srv.docroots["alice"] / "prompted" / small.name) == sha256(small)
    # not a terminal: no prompt, a clear usage error
    p = run(fb("transfer", str(small), srv.url("/prompted/", scheme="http")), env)
    assert p.returncode == 2 and "no password" in p.stderr and "netrc" in p.stderr


def test_password_sources_in_their_documented_order(srv: Daemon, small: Path,
                                                    tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine 127.0.0.1 login alice password {PASSWORDS['alice']}\n")
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(PASSWORDS["alice"] + "\nsecond line ignored\n")
    bad.write_text("wrong\n")
    http = srv.url("/order/", scheme="http")
    hostless = f"http://127.0.0.1:{srv.http_port}/order-netrc/"

    def go(url: str, *opts: str, password: str | None = None) -> int:
        p = run(fb("transfer", str(small), url, "-q", *opts), base_env(tmp_path, password))
        assert "Traceback" not in p.stderr
        return p.returncode

    assert go(http) == 0  # ~/.netrc alone
    assert go(hostless) == 0  # ~/.netrc also gives the user name
    assert sha256(srv.docroots["alice"] / "order-netrc" / small.name) == sha256(small)
    assert go(http, password="wrong") == 3  # FALLBACK_PASSWORD before ~/.netrc
    assert go(http, "--password-file", str(good), password="wrong") == 0  # file before env
    assert go(http, "--password-file", str(bad), password=PASSWORDS["alice"]) == 3
    url_pw = f"http://alice:{PASSWORDS['alice']}@127.0.0.1:{srv.http_port}/order/"
    assert go(url_pw, "--password-file", str(bad)) == 0  # URL before everything
    p = run(fb("transfer", str(small), http, "--password-file", str(tmp_path / "nope")),
            base_env(tmp_path))
    assert p.returncode == 2 and "--password-file" in p.stderr and "No such file" in p.stderr


# -- transports -----------------------------------------------------------------------------------
def test_http_url_means_http_under_auto(srv: Daemon, small: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = run(fb("transfer", str(small), srv.url("/plainhttp/", scheme="http"), "--json", "-v"), env)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["transports"] == ["http"]
    assert "info: transport http: the URL says http://" in p.stderr
    # asked for https: it switches, says so in one line, and verifies the certificate
    p = run(fb("transfer", str(small), srv.url("/switched/", scheme="http"), "--transport",
               "https", "--fingerprint", srv.fingerprint, "--json"), env)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["transports"] == ["https"]
    assert [ln for ln in p.stderr.splitlines() if "switching" in ln] == [
        f"warning: switching http://127.0.0.1:{srv.http_port} to "
        f"https://127.0.0.1:{srv.https_port} (--transport https)"]


# -- version, help, verbosity, exit codes ---------------------------------------------------------
def test_version(tmp_path: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        want = version("fallback")
    except PackageNotFoundError:
        from fallback import __version__ as want
    for flag in ("--version", "-V"):
        p = run(fb(flag), base_env(tmp_path))
        assert p.returncode == 0 and p.stdout == f"fallback {want}\n", p


def test_help_of_every_subcommand(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    pages = {}
    for cmd in ("transfer", "serve", "demo", "config validate", "hash-password", "checksum",
                "encrypt", "decrypt"):
        p = run(fb(*cmd.split(), "--help"), env)
        assert p.returncode == 0 and p.stderr == "", (cmd, p.stderr)
        assert p.stdout.startswith(f"usage: fallback {cmd}"), cmd
        assert "examples:" in p.stdout, cmd
        pages[cmd] = p.stdout
    t = " ".join(pages["transfer"].split())
    for needle in ("URL form:", "default port 8080", "default port 8443", "environment:",
                   "FALLBACK_PASSWORD", "FALLBACK_FILEPASS", "HTTPS_PROXY", "NO_PROXY",
                   "--proxy overrides", "exit status:", "3 the daemon refused",
                   "130 interrupted", "--password-file", "(default: 4)", "(default: auto)",
                   "(default: full)", "(default: diff)", "--json:", "~/.netrc"):
        assert needle in t, needle
    s = " ".join(pages["serve"].split())
    for needle in ("--bind", "--http-port", "--https-port", "--udp-port",
                   "/etc/fallback/aspera.conf", "loopback only"):
        assert needle in s, needle
    top = run(fb("--help"), env).stdout
    assert "exit status:" in top and "--version" in top
    # an unknown option: the subcommand's usage, not the top-level one
    p = run(fb("transfer", "a", "https://x/", "--bogus"), env)
    assert p.returncode == 2
    assert p.stderr.startswith("usage: fallback transfer ")
    assert p.stderr.strip().splitlines()[-1] == \
        "fallback transfer: error: unrecognized arguments: --bogus"
    p = run(fb("serve", "--nope"), env)
    assert p.returncode == 2 and p.stderr.startswith("usage: fallback serve ")


def test_verbosity_levels(srv: Daemon, tmp_path: Path) -> None:
    env = base_env(tmp_path, PASSWORDS["alice"])
    url = srv.url("/f.bin", scheme="http")
    quiet = run(fb("transfer", url, str(tmp_path / "q.bin")), env)
    assert quiet.returncode == 0 and "info:" not in quiet.stderr and "debug:" not in quiet.stderr
    v = run(fb("transfer", url, str(tmp_path / "v.bin"), "-v", "--overwrite", "always"), env)
    assert v.returncode == 0, v.stderr
    assert "info: transport http: the URL says http://" in v.stderr
    assert re.search(r"info: 4 streams \(asked 4, the daemon allows 16\)", v.stderr)
    assert "debug:" not in v.stderr
    vv = run(fb("transfer", url, str(tmp_path / "vv.bin"), "-vv"), env)
    assert vv.returncode == 0, vv.stderr
    assert "debug: password from FALLBACK_PASSWORD" in vv.stderr
    assert re.search(r"debug: POST http://127\.0\.0\.1:\d+/\.fallback/v1/session: 200", vv.stderr)
    # -q still says why it failed, in one line
    q = run(fb("transfer", srv.url("/nope.bin", scheme="http"), str(tmp_path / "n"), "-q"), env)
    assert q.returncode == 1 and len(q.stderr.strip().splitlines()) == 1
    assert q.stderr.startswith("error: ")


def test_exit_codes_and_json_on_every_failure(srv: Daemon, small: Path, tmp_path: Path) -> None:
    http = srv.url("/codes/", scheme="http")
    wrong = run(fb("transfer", str(small), http, "--json"), base_env(tmp_path, "wrong"))
    assert wrong.returncode == 3
    assert last_json(wrong.stdout)["error"] == "wrong user name or password"
    env = base_env(tmp_path, PASSWORDS["alice"])
    cases = [
        fb("transfer", str(small), http, "--json", "--streams", "lots"),  # argparse
        fb("transfer", str(small), "--json"),  # argparse: missing DST
        fb("transfer", str(small), http, "--json", "--bogus"),  # unknown option
        fb("transfer", str(small), str(tmp_path / "x"), "--json"),  # no URL: engine
        fb("transfer", str(small), http, "--json", "--streams", "0"),  # engine
        fb("transfer", str(small), http, "--json", "--fingerprint", "zz"),  # remote
    ]
    for argv in cases:
        p = run(argv, env)
        assert p.returncode == 2, (argv, p.stderr)
        res = last_json(p.stdout)
        assert res["ok"] is False and res["error"], argv
        assert "Traceback" not in p.stderr
    assert not (srv.docroots["alice"] / "codes").exists()


def test_ctrl_c_exits_130_and_ends_the_progress_line(srv: Daemon, tmp_path: Path) -> None:
    big = make_file(tmp_path / "big.bin", 256 << 20, seed=43)
    env = base_env(tmp_path, PASSWORDS["alice"])
    # HTTPS and one stream: seconds of work (TLS-bound), so Ctrl-C lands mid-transfer
    t = Terminal(fb("transfer", str(big), srv.url("/ctrlc/"), "--streams", "1",
                    "--fingerprint", srv.fingerprint), env)
    try:
        t.expect(r"\d+\.\d+/\d+\.\d+ MB", timeout=60)  # the live progress bar is drawn
        t.send("\x03")  # Ctrl-C as the terminal sends it: SIGINT to the foreground group
        code = t.wait(60)
    finally:
        t.kill()
    assert code == 130, t.out
    assert "Traceback" not in t.out
    head, sep, _ = t.out.partition("interrupted: partial files are kept; run again to resume")
    assert sep, t.out
    # the progress line was ended (once: no blank line) before the message
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", head).endswith(f"{big.name}\r\n"), head[-300:]
    assert not (srv.docroots["alice"] / "ctrlc" / "big.bin").exists()


def test_sigterm_closes_the_session_and_exits_143(srv: Daemon, tmp_path: Path) -> None:
    """Before: SIGTERM (``timeout``, ``kill``) killed the client at once, no message, no
    JSON, and its daemon session stayed open, counting against sessions_per_user_max: a
    cron job under ``timeout`` locked its user out (trial). Now it is handled as Ctrl-C."""
    big = make_file(tmp_path / "term.bin", 64 << 20, seed=45)
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = subprocess.Popen(fb("transfer", str(big), srv.url("/term/"), "--json", "-l", "40M",
                            "--fingerprint", srv.fingerprint), env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(3)  # the session is open, the upload under way (at 40 Mbit/s: 13 s in all)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (err, out)
    assert err.strip().splitlines()[-1] == "terminated: partial files are kept; run again to resume"
    assert "Traceback" not in err
    res = last_json(out)
    assert res["ok"] is False and res["error"] == "terminated"
    assert {"transports", "sent_bytes", "checksums", "skipped_files", "bytes"} <= res.keys()
    # the daemon heard the session end (its one log line) instead of waiting for a timeout
    deadline = time.monotonic() + 10
    while not re.search(r"session \w+ user=alice .*path=/term.* result=", srv.log()):
        assert time.monotonic() < deadline, srv.log()[-2000:]
        time.sleep(0.1)
    assert not (srv.docroots["alice"] / "term" / "term.bin").exists()


def test_an_interrupted_stdout_download_does_not_promise_a_resume(srv: Daemon,
                                                                  tmp_path: Path) -> None:
    """Before: "partial files are kept; run again to resume" for ``-`` (its temporary
    folder is gone with the run: nothing to resume, trial)."""
    make_file(srv.docroots["alice"] / "stdout-big.bin", 64 << 20, seed=46)
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = subprocess.Popen(fb("transfer", srv.url("/stdout-big.bin"), "-", "-l", "40M",
                            "--fingerprint", srv.fingerprint), env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(3)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143 and out == "", err
    assert err.strip().splitlines()[-1] == (
        "terminated: standard input or output cannot be resumed; run it again")


# -- encrypt / decrypt ----------------------------------------------------------------------------
def test_decrypt_does_not_overwrite_without_force(tmp_path: Path) -> None:
    env = base_env(tmp_path, FALLBACK_FILEPASS="Tr0ub4dor&3-horse")
    src = make_file(tmp_path / "f.txt", 50_000, seed=44)
    digest = sha256(src)
    assert run(fb("encrypt", str(src)), env).returncode == 0
    enc = tmp_path / "f.txt.fallback-env"
    src.write_text("newer work that must not be lost\n")
    p = run(fb("decrypt", str(enc)), env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"error: {src} exists: name the output (fallback decrypt SRC DST) "
                                "or pass --force to replace it")
    assert src.read_text() == "newer work that must not be lost\n"
    # encrypt's default output is protected the same way
    p = run(fb("encrypt", str(src)), env)
    assert p.returncode == 2 and f"{enc} exists" in p.stderr
    # an explicit output path, or --force
    out = tmp_path / "copy.txt"
    assert run(fb("decrypt", str(enc), str(out)), env).returncode == 0 and sha256(out) == digest
    assert run(fb("decrypt", str(enc), "--force"), env).returncode == 0 and sha256(src) == digest


# -- serve ----------------------------------------------------------------------------------------
def test_serve_default_config_overrides_and_no_users(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    conf = cfg / "aspera.conf"
    conf.write_text('<CONF version="2"><server><state_dir>st</state_dir></server>'
                    "<http_server><http_port>1</http_port><https_port>2</https_port>"
                    "<enable_http>true</enable_http><bind_address>0.0.0.0</bind_address>"
                    "</http_server></CONF>\n")
    v = run(fb("config", "validate", str(conf)), base_env(tmp_path))
    assert v.returncode == 0 and v.stderr == ""
    assert v.stdout.splitlines()[-1] == "warning: no <user> in <users>: nobody can log in"
    http, https = free_port(), free_port()
    env = base_env(tmp_path)
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen(fb("serve", "--bind", "127.0.0.1", "--http-port", str(http),
                            "--https-port", str(https)), stdout=subprocess.PIPE, stderr=log,
                         text=True, env=env, cwd=tmp_path / "home")
    try:
        assert p.stdout is not None
        lines: list[str] = []
        while (line := p.stdout.readline()) and line.strip() != "ready":
            lines.append(line.rstrip("\n"))
        assert line, (tmp_path / "serve.log").read_text()
        assert lines[0] == f"config {conf} (found in a default location; --config FILE for another)"
        assert f"serving http://localhost:{http}/" in lines
        assert f"serving https://localhost:{https}/" in lines
        assert "listening on 127.0.0.1 only: other hosts cannot connect (bind_address or --bind " \
               "0.0.0.0 to serve the network)" in lines
        assert "warning: no users are configured: nobody can log in" in lines
        # state_dir is relative to the config file's folder, not to the working directory
        assert (cfg / "st" / "cert.pem").is_file() and not (tmp_path / "home" / "st").exists()
        with socket.create_connection(("127.0.0.1", http), timeout=5):
            pass
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        log.close()
    assert "nobody can log in" in (tmp_path / "serve.log").read_text()
    bad = run(fb("serve", "--bind", "not a host!"), env)
    assert bad.returncode == 2 and "--bind" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(fb("serve", "--http-port", "70000"), env)
    assert bad.returncode == 2 and "70000 is out of range" in bad.stderr


# -- access log -----------------------------------------------------------------------------------
def test_access_log_line_per_plain_http_request(srv: Daemon, tmp_path: Path) -> None:
    import base64

    def auth(user: str, pw: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    mark = len(srv.log())
    body = os.urandom(70_000)
    for method, path, headers, data, status in (
        ("GET", "/f.bin", auth("alice", PASSWORDS["alice"]), None, 200),
        ("HEAD", "/f.bin", auth("alice", PASSWORDS["alice"]), None, 200),
        ("PUT", "/acc/up%20load.bin", auth("alice", PASSWORDS["alice"]), body, 201),
        ("GET", "/f.bin", auth("mallory", "x"), None, 401),
        ("GET", "/missing.bin", auth("alice", PASSWORDS["alice"]), None, 404),
    ):
        c = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        r.read()
        assert r.status == status, (method, path, r.status)
        c.close()
    deadline = time.monotonic() + 10
    while srv.log()[mark:].count("fallback.access") < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [ln for ln in srv.log()[mark:].splitlines() if " fallback.access " in ln]
    got = [re.sub(r"^.* fallback\.access INFO ", "", ln) for ln in lines]
    pat = r"127\.0\.0\.1 {} {} user={} status={} bytes={} seconds=\d+\.\d{{3}}"
    expect = [("GET", "/f\\.bin", "alice", 200, 300000), ("HEAD", "/f\\.bin", "alice", 200, 0),
              ("PUT", "/acc/up%20load\\.bin", "alice", 201, 70000),
              ("GET", "/f\\.bin", "mallory", 401, r"\d+"), ("GET", "/missing\\.bin", "alice", 404,
                                                             r"\d+")]
    assert len(got) == len(expect), got
    for line, e in zip(got, expect, strict=True):
        assert re.fullmatch(pat.format(*e), line), (line, e)
    # the control API has its session lines, not access lines
    assert "/.fallback/" not in "\n".join(lines)

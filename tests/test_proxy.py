"""Reaching the daemon through an HTTP proxy (issue 13): CONNECT for HTTPS, forwarding
for HTTP, Basic proxy authentication, NO_PROXY, and certificate pinning through the
tunnel. A real proxy (``tests/proxy.py``) and a real daemon, both subprocesses on
loopback; the proxy logs each request, so every test knows whether it was used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fallback.proxy import parse_proxy, proxy_for
from tests.conftest import Daemon, make_file, sha256

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy variable (an empty lower-case one would
    hide an upper-case one: urllib reads lower case first), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    return {**env, "FALLBACK_PASSWORD": "alice-secret", **extra}


def run_cli(*args: str, env: dict[str, str]) -> tuple[int, dict, str]:
    out = subprocess.run([sys.executable, "-m", "fallback", "transfer", *args, "--json", "-q"],
                         capture_output=True, text=True, env=env, timeout=120,
                         stdin=subprocess.DEVNULL)
    lines = out.stdout.strip().splitlines()
    return out.returncode, json.loads(lines[-1]) if lines else {}, out.stderr


@dataclass
class RunningProxy:
    port: int
    log: Path
    proc: subprocess.Popen[str]

    def url(self, cred: str = "") -> str:
        return f"http://{cred + '@' if cred else ''}127.0.0.1:{self.port}"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def start_proxy(tmp: Path, auth: str | None = None, cmd: Callable[..., list[str]] | None = None,
                listen: str = "127.0.0.1:0") -> RunningProxy:
    """Start ``tests/proxy.py``; ``cmd`` wraps its argv (e.g. to run it in a namespace)."""
    log = tmp / f"proxy-{os.urandom(3).hex()}.log"
    argv = [sys.executable, "-m", "tests.proxy", "--listen", listen, "--log", str(log)]
    if auth:
        argv += ["--auth", auth]
    proc = subprocess.Popen(cmd(*argv) if cmd else argv, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"proxy did not start: {line!r}"
    return RunningProxy(int(line.split()[1]), log, proc)


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def make(auth: str | None = None) -> RunningProxy:
        p = start_proxy(tmp_path, auth)
        started.append(p)
        return p

    yield make
    for p in started:
        p.proc.kill()
        p.proc.wait()


def _upload(daemon: Daemon, tmp_path: Path, name: str, *opts: str, scheme: str = "https",
            env: dict[str, str] | None = None, check: bool = True,
            size: int = 3 << 20) -> tuple[int, dict, str, Path]:
    src = make_file(tmp_path / name, size, seed=len(name))
    rc, res, err = run_cli(str(src), daemon.url("/", scheme=scheme), "--retries", "0",
                           "--fingerprint", daemon.fingerprint, *opts, env=clean_env(**(env or {})))
    if check:
        assert rc == 0, err
    return rc, res, err, src


def test_https_through_proxy_tunnels_and_keeps_the_pin(daemon: Daemon, tmp_path: Path,
                                                        proxy_factory: Callable[..., RunningProxy]
                                                        ) -> None:
    p = proxy_factory()
    rc, res, err, src = _upload(daemon, tmp_path, "via.bin", "--proxy", p.url())
    assert res["ok"] and res["transports"] == ["https"]
    assert sha256(daemon.docroots["alice"] / "via.bin") == sha256(src)
    assert f"CONNECT 127.0.0.1:{daemon.https_port} 200" in p.lines()
    assert res["proxy"] == p.url()
    assert "through the proxy" in res["transport_reason"] and "--proxy" in res["transport_reason"]
    assert "carries no UDP" in res["transport_reason"]
    out = subprocess.run([sys.executable, "-m", "fallback", "transfer", str(src),
                          daemon.url("/v.bin"), "-v", "--proxy", p.url(), "--fingerprint",
                          daemon.fingerprint], capture_output=True, text=True, env=clean_env(),
                         timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert f"UDP not tried: through the proxy {p.url()}: a proxy carries no UDP" in out.stderr
    # The daemon's certificate is still checked inside the tunnel: a wrong pin is refused.
    wrong = "SHA256 " + ":".join(["AB"] * 32)
    src2 = make_file(tmp_path / "pinned.bin", 1 << 20)
    rc, res, err = run_cli(str(src2), daemon.url("/"), "--fingerprint", wrong, "--proxy", p.url(),
                           "--retries", "0", env=clean_env())
    assert rc == 1 and "does not match --fingerprint" in err
    assert not (daemon.docroots["alice"] / "pinned.bin").exists()


def test_remembered_certificate_is_pinned_through_the_proxy(
        daemon: Daemon, tmp_path: Path, proxy_factory: Callable[..., RunningProxy]) -> None:
    """known_hosts (trust on first use) applies to the daemon behind a CONNECT tunnel."""
    p = proxy_factory()
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "known_hosts").write_text(
        f"127.0.0.1:{daemon.https_port} SHA256 {':'.join(['CD'] * 32)}\n")
    src = make_file(tmp_path / "tofu.bin", 1 << 20)
    env = clean_env(FALLBACK_CONFIG_DIR=str(conf), HTTPS_PROXY=p.url())
    out = subprocess.run([sys.executable, "-m", "fallback", "transfer", str(src),
                          daemon.url("/"), "-q", "--retries", "0"],
                         capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stderr
    assert "does not match the one remembered" in out.stderr and "known_hosts" in out.stderr
    assert any(line.startswith("CONNECT ") for line in p.lines())  # it did go through the proxy
    (conf / "known_hosts").write_text(f"127.0.0.1:{daemon.https_port} SHA256 {daemon.fingerprint}\n")
    out = subprocess.run([sys.executable, "-m", "fallback", "transfer", str(src),
                          daemon.url("/"), "-q", "--retries", "0"],
                         capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert sha256(daemon.docroots["alice"] / "tofu.bin") == sha256(src)


def test_http_through_proxy_from_env_with_basic_auth(daemon: Daemon, tmp_path: Path,
                                                     proxy_factory: Callable[..., RunningProxy]
                                                     ) -> None:
    p = proxy_factory(auth="pu:p%ss")
    rc, res, err, src = _upload(daemon, tmp_path, "fwd.bin", scheme="http",
                                env={"HTTP_PROXY": p.url("pu:p%25ss")})
    assert res["ok"] and res["transports"] == ["http"]
    assert sha256(daemon.docroots["alice"] / "fwd.bin") == sha256(src)
    lines = p.lines()
    assert any(f"127.0.0.1:{daemon.http_port}/.fallback/v1/session " in line + " "
               and line.endswith("forwarded") for line in lines), lines
    assert not any(line.endswith("407") for line in lines)
    assert "HTTP_PROXY" in res["transport_reason"] and res["proxy"] == p.url()
    # HTTPS through the same proxy with its credentials: CONNECT carries them.
    rc, res, err, src = _upload(daemon, tmp_path, "tun.bin", env={"HTTPS_PROXY": p.url("pu:p%25ss")})
    assert res["ok"] and f"CONNECT 127.0.0.1:{daemon.https_port} 200" in p.lines()
    # and a download back through it, over HTTP (forwarded) and HTTPS (tunnelled)
    for scheme, var in (("http", "HTTP_PROXY"), ("https", "HTTPS_PROXY")):
        dst = tmp_path / f"back-{scheme}"
        dst.mkdir()
        before = len(p.lines())
        rc, res, err = run_cli(daemon.url("/tun.bin", scheme=scheme), str(dst) + "/",
                               "--fingerprint", daemon.fingerprint, "--retries", "0",
                               env=clean_env(**{var: p.url("pu:p%25ss")}))
        assert rc == 0, err
        assert sha256(dst / "tun.bin") == sha256(src) and res["proxy"] == p.url()
        assert len(p.lines()) > before


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("cred", ["", "pu:wrong"])
def test_proxy_refusing_credentials_is_a_clear_auth_error(
        daemon: Daemon, tmp_path: Path, proxy_factory: Callable[..., RunningProxy],
        scheme: str, cred: str) -> None:
    p = proxy_factory(auth="pu:right")
    rc, res, err, _ = _upload(daemon, tmp_path, f"no-{scheme}-{len(cred)}.bin", "--proxy",
                              p.url(cred), scheme=scheme, check=False, size=1 << 20)
    assert rc == 3, err  # as a refused login
    assert res["ok"] is False and "407" in res["error"] and "proxy" in res["error"]
    assert ("refused the credentials" if cred else "asks for credentials") in res["error"]
    assert "wrong" not in err  # the proxy password is never printed
    assert not (daemon.docroots["alice"] / f"no-{scheme}-{len(cred)}.bin").exists()


def test_no_proxy_bypasses_the_proxy(daemon: Daemon, tmp_path: Path,
                                     proxy_factory: Callable[..., RunningProxy]) -> None:
    p = proxy_factory()
    rc, res, err, src = _upload(daemon, tmp_path, "direct.bin",
                                env={"HTTPS_PROXY": p.url(), "NO_PROXY": "localhost,127.0.0.1"})
    assert res["ok"] and res["proxy"] is None and "proxy" not in res["transport_reason"]
    assert p.lines() == []
    # --proxy none: direct whatever the environment says
    rc, res, err, src = _upload(daemon, tmp_path, "none.bin", "--proxy", "none",
                                env={"HTTPS_PROXY": p.url()})
    assert res["ok"] and res["proxy"] is None and p.lines() == []


def test_proxy_that_cannot_reach_the_daemon(daemon: Daemon, tmp_path: Path,
                                            proxy_factory: Callable[..., RunningProxy]) -> None:
    p = proxy_factory()
    daemon.stop()
    rc, res, err, _ = _upload(daemon, tmp_path, "gone.bin", "--proxy", p.url(), "--no-fallback",
                              check=False, size=1 << 20)
    assert rc == 1 and "502" in res["error"] and f"127.0.0.1:{daemon.https_port}" in res["error"]


def test_proxy_choice_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """``proxy_for``: per scheme from the environment, --proxy over it, NO_PROXY over both."""
    for k in PROXY_VARS:
        monkeypatch.delenv(k, raising=False)
    assert proxy_for("https", "d.example", None) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://u:pw@px:3128")
    monkeypatch.setenv("HTTP_PROXY", "px2:8000")
    got = proxy_for("https", "d.example", None)
    assert got is not None and got.address == "http://px:3128" and got.authenticated
    assert got.url == "http://u:pw@px:3128" and "pw" not in repr(got) and "pw" not in got.shown
    plain = proxy_for("http", "d.example", None)
    assert plain is not None and plain.address == "http://px2:8000" and not plain.authenticated
    explicit = proxy_for("https", "d.example", "http://other:1")
    assert explicit is not None and explicit.source == "--proxy"
    assert proxy_for("https", "d.example", "none") is None
    monkeypatch.setenv("NO_PROXY", ".example")
    assert proxy_for("https", "d.example", None) is None
    assert proxy_for("https", "d.example", "http://other:1") is None
    assert proxy_for("https", "d.elsewhere", None) is not None
    with pytest.raises(Exception, match="plain HTTP"):
        parse_proxy("https://px:3128", "--proxy")

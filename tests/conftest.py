"""Shared fixtures: real daemons as subprocesses on loopback, real files.

``daemon`` starts ``python -m fallback serve`` with a generated config on free
ports and yields a handle with URLs, the certificate fingerprint and helpers
to run the CLI against it. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
# The CLI keeps known_hosts (and serve looks for aspera.conf) in the user's config folder:
# the suite gets an empty one of its own, inherited by every process it starts.
os.environ["FALLBACK_CONFIG_DIR"] = tempfile.mkdtemp(prefix="fallback-test-config-")
_HASHES: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def password_hash(user: str) -> str:
    if user not in _HASHES:
        from fallback.auth import hash_password

        _HASHES[user] = hash_password(PASSWORDS[user])
    return _HASHES[user]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of pseudo-random bytes (cheap, reproducible), written in 1 MiB pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.blake2b(str(seed).encode(), digest_size=64).digest() * (1 << 14)
    with open(path, "wb") as f:
        left, n = size, 0
        while left > 0:
            piece = hashlib.blake2b(block[:64] + n.to_bytes(8, "big")).digest() + block[64:]
            f.write(piece[: min(left, len(piece))])
            left -= min(left, len(piece))
            n += 1
    return path


@dataclass
class Daemon:
    base: Path
    http_port: int
    https_port: int
    docroots: dict[str, Path]
    extra_xml: str = ""
    udp_port: int | None = None  # None: the daemon runs with --no-udp
    proc: subprocess.Popen[str] | None = None
    fingerprint: str = ""
    log_lines: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.base / "aspera.conf"

    @property
    def log_path(self) -> Path:
        return self.base / "daemon.log"

    def write_config(self) -> None:
        users = "".join(
            f"<user><name>{u}</name><password_hash>{password_hash(u)}</password_hash>"
            f"<docroot>{root}</docroot></user>"
            for u, root in self.docroots.items()
        )
        self.config_path.write_text(
            f"""<?xml version='1.0' encoding='UTF-8'?>
<CONF version="2">
  <server><state_dir>{self.base / "state"}</state_dir></server>
  <http_server>
    <http_port>{self.http_port}</http_port><https_port>{self.https_port}</https_port>
    <enable_http>true</enable_http><enable_https>true</enable_https>
    <bind_address>127.0.0.1</bind_address>
  </http_server>
  {self.extra_xml}
  <users>{users}</users>
</CONF>
"""
        )

    def command(self) -> list[str]:
        """The daemon's command line (a subclass may run it elsewhere, in a namespace)."""
        return [sys.executable, "-m", "fallback", "serve", "--config", str(self.config_path),
                *(["--no-udp"] if self.udp_port is None else ["--udp-port", str(self.udp_port)])]

    def environment(self) -> dict[str, str] | None:
        """The daemon's environment (None: this process's)."""
        return None

    def start(self) -> Daemon:
        for root in self.docroots.values():
            root.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.write_config()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log,
                                     text=True, cwd=self.base, env=self.environment())
        _STARTED.append(self.proc)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()}")
            if "fingerprint SHA256" in line:
                self.fingerprint = line.rsplit(" ", 1)[1].strip()
            if line.strip() == "ready":
                return self
        raise RuntimeError("daemon did not become ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def url(self, path: str = "/", user: str = "alice", scheme: str = "https") -> str:
        port = self.https_port if scheme == "https" else self.http_port
        return f"{scheme}://{user}@127.0.0.1:{port}{path}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli_args(self, *args: str, fingerprint: bool = True) -> list[str]:
        extra = ["--fingerprint", self.fingerprint] if fingerprint and self.fingerprint else []
        return [sys.executable, "-m", "fallback", *args, *extra]

    def transfer(self, src: str, dst: str, *opts: str, user: str = "alice",
                 password: str | None = None, check: bool = True, timeout: float = 300,
                 env: dict[str, str] | None = None) -> tuple[int, dict, str]:
        """Run ``fallback transfer --json``; returns (exit code, JSON result, stderr)."""
        e = {**os.environ, "FALLBACK_PASSWORD": password or PASSWORDS[user], **(env or {})}
        p = subprocess.run(self.cli_args("transfer", src, dst, "--json", "-q", *opts),
                           capture_output=True, text=True, timeout=timeout, env=e)
        out = p.stdout.strip().splitlines()
        result = json.loads(out[-1]) if out else {}
        if check and p.returncode != 0:
            raise AssertionError(f"transfer failed rc={p.returncode}: {p.stderr}\n{result}")
        return p.returncode, result, p.stderr


_STARTED: list[subprocess.Popen[str]] = []
"""Every daemon a test started: the session's end stops those still running."""


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_suite() -> Iterator[None]:
    """Daemons a test started and did not stop (one that failed before its own cleanup,
    or one that never had any) are stopped when the suite ends: a CI run once left six
    behind, holding ports and memory."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def net() -> Iterator[Any]:
    """Two network namespaces on a veth (``tests.netns.Net``), removed at the end; the
    test is skipped where they cannot be made (not root, no ``ip netns``)."""
    from tests import netns  # only the tests that cut the network need it

    why = netns.skip_reason()
    if why:
        pytest.skip(why)
    with netns.Net() as n:
        password_hash("alice")  # before the first daemon: hashing is slow
        yield n


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def make(extra_xml: str = "", users: tuple[str, ...] = ("alice", "bob"), start: bool = True,
             base: Path | None = None, udp: bool = False) -> Daemon:
        b = base or tmp_path / f"daemon{len(started)}"
        b.mkdir(parents=True, exist_ok=True)
        d = Daemon(b, free_port(), free_port(), {u: b / "docroot" / u for u in users}, extra_xml,
                   udp_port=free_udp_port() if udp else None)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


@pytest.fixture
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    return daemon_factory()


@pytest.fixture
async def api_for() -> AsyncIterator[Callable[..., Any]]:
    """Control-API clients (``tests.control_client.Api``) for daemons: ``api_for(d)``, or
    ``api_for(d, timeout=60)`` (seconds per request, 20 by default) where a call may read
    a lot; every client is closed at the end of the test."""
    import aiohttp

    from tests.control_client import Api  # it imports this module: not at the top

    clients: list[aiohttp.ClientSession] = []

    def make(d: Daemon, timeout: float = 20.0) -> Api:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        clients.append(http)
        return Api(d, http)

    yield make
    for c in clients:
        await c.close()

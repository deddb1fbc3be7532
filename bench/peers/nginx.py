"""nginx as a reference HTTP/HTTPS server (downloads, and PUT uploads through WebDAV).

Everything nginx touches lives in the caller's run directory (config, pid, logs, temp paths,
self-signed certificate), so it runs beside a system nginx, needs no /var/lib/nginx, and leaves
nothing behind.  Works on plain loopback or, with ``launch=link.run_in_b``, inside a namespace::

    h = start_nginx(docroot, 18081, 18444, run_dir)          # loopback, binds 127.0.0.1
    h.url("file.bin", https=True)                            # https://127.0.0.1:18444/file.bin
    h.stop()
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.proc import ServerProbe

READY_TIMEOUT_S = 15.0
UPLOAD_LOCATION = "/upload/"

Launcher = Callable[..., "subprocess.Popen[Any]"]


def make_self_signed(out_dir: Path, ips: Sequence[str], cn: str = "fallback-bench") -> tuple[
    Path, Path
]:
    """ECDSA P-256 certificate valid for *ips* (clients use -k / --fingerprint anyway)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert, key = out_dir / "cert.pem", out_dir / "key.pem"
    san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "3", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def render_config(
    root_dir: Path, run_dir: Path, bind: str, http_port: int, https_port: int,
    cert: Path, key: Path, workers: str,
) -> str:
    """nginx.conf text: static files from *root_dir*, PUT into *root_dir*/upload/."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read/write the run dir
    tmp = run_dir / "tmp"
    return f"""{user}worker_processes {workers};
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    server {{
        listen {bind}:{http_port};
        listen {bind}:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root_dir};
        location {UPLOAD_LOCATION} {{
            dav_methods PUT DELETE MKCOL;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"""


@dataclass
class NginxHandle:
    """A running nginx; ``stop()`` (or leaving the ``with`` block) ends it."""

    proc: subprocess.Popen[Any]
    root_dir: Path
    run_dir: Path
    host: str
    http_port: int
    https_port: int
    cert: Path
    key: Path
    probe: ServerProbe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = ServerProbe(self.proc.pid)

    @property
    def pid(self) -> int:
        """Master pid (``ip netns exec`` execs in place, so this is nginx itself)."""
        return self.proc.pid

    def url(self, path: str = "", https: bool = False, host: str | None = None) -> str:
        """URL of *path* under the docroot (``upload/x`` for PUT targets)."""
        scheme, port = ("https", self.https_port) if https else ("http", self.http_port)
        return f"{scheme}://{host or self.host}:{port}/{path.lstrip('/')}"

    def stop(self) -> None:
        """Graceful-then-hard stop, bounded in time."""
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM = fast shutdown for nginx
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> NginxHandle:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_nginx(
    root_dir: Path | str,
    http_port: int,
    https_port: int,
    run_dir: Path | str,
    *,
    bind: str = "127.0.0.1",
    launch: Launcher | None = None,
    cert_ips: Sequence[str] = ("127.0.0.1", "10.77.0.2"),
    workers: str = "auto",
) -> NginxHandle:
    """Start nginx serving *root_dir* on *http_port* and *https_port* (TLS, self-signed).

    *launch* runs the argv (default: plain ``subprocess.Popen``; pass ``link.run_in_b`` to run
    it inside the emulated link's namespace B and ``bind="0.0.0.0"``).  Returns once the pid file
    exists, which nginx writes only after its listening sockets are bound.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root, run = Path(root_dir).resolve(), Path(run_dir).resolve()
    (root / UPLOAD_LOCATION.strip("/")).mkdir(parents=True, exist_ok=True)
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    cert, key = make_self_signed(run / "tls", [*cert_ips, bind] if bind != "0.0.0.0" else cert_ips)
    conf = run / "nginx.conf"
    conf.write_text(render_config(root, run, bind, http_port, https_port, cert, key, workers))
    pidfile = run / "nginx.pid"
    pidfile.unlink(missing_ok=True)
    argv = [nginx, "-p", str(run), "-e", str(run / "error.log"), "-c", str(conf)]
    launcher: Launcher = launch or subprocess.Popen
    log = open(run / "nginx.stderr", "wb")  # noqa: SIM115 - handed to the child
    proc = launcher(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    host = "127.0.0.1" if bind == "0.0.0.0" else bind
    handle = NginxHandle(proc, root, run, host, http_port, https_port, cert, key)
    end = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < end:
        if pidfile.exists() and pidfile.read_text().strip():
            return handle
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    handle.stop()
    err = (run / "error.log").read_text(errors="replace")[-1500:] if (run / "error.log").exists() else ""
    raise RuntimeError(f"nginx did not start: {err}")

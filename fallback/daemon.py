"""``fallback serve``: one process serving the storage root over HTTP and HTTPS.

Signals: SIGTERM/SIGINT stop accepting, let streams end at a block boundary,
checkpoint every receiver's journal and exit 0; SIGHUP reloads the config
(users, limits, policies) while running transfers go on. Ports and
certificates are read at start only; a reload that changes them says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from pathlib import Path
from typing import TextIO

from aiohttp import web

from fallback.accesslog import PlainAccessLogger, access_logger
from fallback.config import Config, ConfigError, load_config
from fallback.daemonctx import DaemonState
from fallback.listener import ConnectionLimits, SniffingSite
from fallback.server import make_app
from fallback.sweeper import PartialSweeper
from fallback.tls import ensure_self_signed, server_ssl_context
from transport.udp.sockopt import BULK_MMAP_THRESHOLD, tune_malloc

log = logging.getLogger("fallback.daemon")
REAP_INTERVAL = 5.0
READ_BUFSIZE = 1 << 20
"""Request-body buffer before aiohttp pauses the socket: its 64 KiB default makes a
4 MiB block cost ~60 pause/resume round trips and capped uploads near 130 MB/s."""
IDLE_LIMIT = 3600.0  # sessions with no timeout configured are still dropped after an hour idle
UNUSED_LIMIT = 600.0  # ... and after 10 minutes when no call was made after the open


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp logs a traceback for a client that disconnects mid-body; one line is enough.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def tls_files(config: Config) -> tuple[Path, Path, str]:
    """``(cert, key, fingerprint)``: the configured pair, or the generated one in ``state_dir``,
    which covers this host's names and addresses (``fallback.tls.host_names``) and
    ``<cert_names>``, and is generated anew when one of those is missing from it."""
    from fallback.tls import fingerprint, host_names

    if config.cert_file and config.key_file:
        return config.cert_file, config.key_file, fingerprint(config.cert_file)
    cert = config.state_dir / "cert.pem"
    key = config.state_dir / "key.pem"
    config.state_dir.mkdir(parents=True, exist_ok=True)
    dns, ips = host_names(config.bind_address, config.cert_names)
    fp = ensure_self_signed(cert, key, dns, ips)
    return cert, key, fp


def _startup_notes(config: Config, cert: Path | None, out: TextIO) -> None:
    """What an operator needs to know before the first client connects."""
    if cert is not None:
        if config.cert_file:
            print(f"clients verify it with --cacert (the CA that signed {cert}) or "
                  "--fingerprint", file=out)
        else:
            from fallback.tls import certificate_names

            dns, ips = certificate_names(cert)
            print(f"clients verify it with --cacert {cert} (names: {', '.join(dns + ips)})",
                  file=out)
    host = config.bind_address
    if _is_loopback(host):
        print(f"listening on {host} only: other hosts cannot connect (bind_address or "
              "--bind 0.0.0.0 to serve the network)", file=out)
    else:
        print(f"listening on {'all addresses' if host in ('0.0.0.0', '::') else host}",
              file=out)
    for warning in config.warnings:  # the ones `config validate` prints (weak hashes, ...)
        print(warning, file=out)
        log.warning("%s", warning)
    if not config.users:
        print("warning: no users are configured: nobody can log in", file=out)
        log.warning("no users are configured: nobody can log in")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def run_daemon(config: Config, out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
    state = DaemonState(config)
    app = make_app(state)
    runner = web.AppRunner(app, handle_signals=False, access_log=access_logger(),
                           access_log_class=PlainAccessLogger, shutdown_timeout=3.0,
                           read_bufsize=READ_BUFSIZE, keepalive_timeout=config.keepalive_timeout)
    await runner.setup()
    ssl_ctx, cert = None, None
    if config.enable_https:
        try:
            cert, key, fp = tls_files(config)
            ssl_ctx = server_ssl_context(cert, key)
        except (ValueError, OSError) as exc:  # not PEM, key does not match, unreadable
            where = config.cert_file or config.state_dir / "cert.pem"
            why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            print(f"error: cannot use the TLS certificate {where}: {why}", file=sys.stderr)
            await runner.cleanup()
            return 2
        print(f"certificate {cert} fingerprint SHA256 {fp}", file=out)
    host = config.bind_address
    limits = connection_limits(config)
    # Every port goes through SniffingSite, so every connection is counted and every first
    # request has a header deadline (a TCPSite would hand raw sockets to aiohttp unbounded).
    t = float(config.header_timeout)
    make = functools.partial(SniffingSite, runner, header_timeout=t, sniff_timeout=t,
                            handshake_timeout=t, limits=limits)
    sites: list[web.BaseSite] = []
    if config.shared_port:
        sites.append(make(host, config.http_port, ssl_ctx))
    else:
        if config.enable_http:
            sites.append(make(host, config.http_port, None))
        if config.enable_https:
            sites.append(make(host, config.https_port, ssl_ctx, plain=False))
    ports = [config.http_port] if config.shared_port else (
        ([config.http_port] if config.enable_http else [])
        + ([config.https_port] if config.enable_https else []))
    for site, port in zip(sites, ports, strict=True):
        try:
            await site.start()
        except OSError as exc:  # the address and port it names (a trial could not tell which)
            print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)
            await runner.cleanup()
            return 1
    from fallback.udpserver import UdpService

    state.udp = await UdpService.start(config)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    if config.enable_http:
        print(f"serving http://{shown}:{config.http_port}/", file=out)
    if config.enable_https:
        print(f"serving https://{shown}:{config.https_port}/", file=out)
    if config.shared_port:
        print(f"http and https share port {config.http_port}", file=out)
    print(f"docroot {', '.join(f'{u.name}={u.docroot}' for u in config.users) or '(no users)'}",
          file=out)
    _startup_notes(config, cert, out)
    # Handlers go in before "ready": a supervisor may signal as soon as it reads that line,
    # and the default action of SIGHUP/SIGTERM would kill the daemon without a checkpoint.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(state))
    log.info("connections: at most %d open, %d per address; request headers within %ds, "
             "idle keep-alive closed after %ds", limits.total, limits.per_address,
             config.header_timeout, config.keepalive_timeout)
    print("ready", file=out, flush=True)
    reaper = loop.create_task(_reap(state))
    sweeper = loop.create_task(PartialSweeper(state).run())  # abandoned partials (sweeper.py)
    await stop.wait()
    log.info("stopping: checkpointing %d sessions", len(state.table.sessions))
    state.stopping.set()
    state.checker.shutdown()  # queued password checks answer 503 now, not after the backlog
    reaper.cancel()
    sweeper.cancel()
    await runner.cleanup()
    await state.table.close_all("daemon stopped")
    if state.udp is not None:
        await state.udp.close()
    state.executor.shutdown(wait=True)
    log.info("stopped")
    return 0


def connection_limits(config: Config) -> ConnectionLimits:
    """The configured bounds, kept under half the open-files limit: the other half is for
    the files themselves (sources, partials, journals), so a connection flood alone
    cannot make the daemon fail its transfers with EMFILE."""
    total = config.connections_max
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            total = min(total, max(8, soft // 2))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX
        pass
    return ConnectionLimits(total, min(config.connections_per_address_max, total))


def _reload(state: DaemonState) -> None:
    old = state.config
    if old.path is None:
        log.info("SIGHUP: no config file to reload")
        return
    try:
        new = load_config(old.path)
    except ConfigError as exc:
        for p in exc.problems:
            log.error("reload refused: %s", p)
        return
    for warning in new.warnings:
        log.warning("reload: %s", warning)
    state.config = new
    if (new.http_port, new.https_port, new.enable_http, new.enable_https, new.bind_address) != (
        old.http_port, old.https_port, old.enable_http, old.enable_https, old.bind_address
    ):
        log.warning("reload: listening ports and addresses change only on restart")
    log.info("reloaded %s: %d users", new.path, len(new.users))


async def _reap(state: DaemonState) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL)
        timeout = state.config.session_activity_timeout
        await state.table.reap(timeout or IDLE_LIMIT, unused=timeout or UNUSED_LIMIT)


def serve(config: Config, verbose: bool = False) -> int:
    setup_logging(verbose)
    tune_malloc(BULK_MMAP_THRESHOLD)  # block reads and stream chunks reuse the heap
    try:
        import uvloop

        return uvloop.run(run_daemon(config))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run_daemon(config))

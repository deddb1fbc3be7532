"""The ``fallback`` command line (the parser and help texts: ``fallback.cliargs``).

Exit codes (a public contract, only ever added to): 0 success, 1 the transfer (or
daemon) failed, 2 bad usage or bad config, 3 the daemon refused the credentials
(HTTP 401), 130 interrupted by Ctrl-C. With ``--json`` the last line of standard
output is one JSON object whose keys are only ever added to, never renamed; a
usage error too prints one, ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fallback.cliargs import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ArgsError,
    Parser,
    parse,
)
from fallback.errors import FallbackError, TransferError, UsageError
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.errors import TransportError

if TYPE_CHECKING:
    from fallback.config import Config


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"bad size {text!r} (examples: 4096, 64K, 4M, 2G)") from None


def _passphrase(confirm: bool) -> str:
    pw = os.environ.get("FALLBACK_FILEPASS")
    if pw:
        return pw
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: set FALLBACK_FILEPASS")
    pw = getpass.getpass("File passphrase: ")
    if confirm and getpass.getpass("Again: ") != pw:
        raise UsageError("passphrases do not match")
    if not pw:
        raise UsageError("empty passphrase")
    return pw


def _block_size(text: str) -> int:
    from transport.blocks.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

    n = parse_size(text)
    if not MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE:
        raise UsageError(f"--block-size {text}: must be between 4K and 64M")
    return n


def _interactive() -> bool:
    """A person at a terminal: stdin and stderr are TTYs (as ssh decides to ask)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _setup_logging(verbosity: int, quiet: bool) -> None:
    """``fallback.client`` to stderr: warnings by default, -v info, -vv debug, -q errors only.
    The handler looks ``sys.stderr`` up per record, so lines land above a live progress bar."""

    class Stderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                print(f"{record.levelname.lower()}: {self.format(record)}", file=sys.stderr,
                      flush=True)
            except Exception:  # noqa: BLE001 - logging must never break a transfer
                self.handleError(record)

    logger = logging.getLogger("fallback.client")
    logger.handlers[:] = [Stderr()]
    logger.propagate = False
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG)
    logger.setLevel(level)


def _credentials(a: argparse.Namespace) -> tuple[str | None, str | None]:
    """User and password for the transfer's URL, in the documented order (see
    ``fallback.credentials``), ending with a prompt on a terminal (as scp does)."""
    from fallback.credentials import resolve
    from fallback.remote import is_url, parse_url

    ends = [x for x in (a.src, a.dst) if is_url(x)]
    if len(ends) != 1:
        return a.user, None  # the engine says what is wrong with the ends
    url = parse_url(ends[0])
    creds = resolve(url.host, a.user or url.user, url.password, password_file=a.password_file)
    pw, source = creds.password, creds.source
    if pw is None and creds.user and sys.stdin.isatty():
        pw, source = getpass.getpass(f"{creds.user}@{url.host}'s password: "), "prompt"
    if pw is not None:
        logging.getLogger("fallback.client").debug("password from %s", source)
    return creds.user, pw


def _offer_trust(exc: BaseException | None, a: argparse.Namespace) -> bool:
    """After an untrusted certificate: print what to do; on a terminal, ask whether to trust
    it and remember it (trust on first use). True when it was remembered."""
    from fallback.known_hosts import CertificateChanged, CertificateNotTrusted, remember

    if isinstance(exc, CertificateChanged):
        for line in exc.hint():
            print(line, file=sys.stderr)
        return False
    if not isinstance(exc, CertificateNotTrusted):
        return False
    for line in exc.hint():
        print(line, file=sys.stderr)
    explicit = a.cacert or a.fingerprint or a.insecure
    if explicit or exc.presented is None or not _interactive():
        return False
    sys.stderr.write("Trust this certificate and remember it for "
                     f"{exc.host}:{exc.port}? (yes/no) ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        return False
    try:
        known = remember(exc.host, exc.port, exc.presented)
    except OSError as err:
        print(f"error: cannot remember it: {err.strerror or err}", file=sys.stderr)
        return False
    print(f"remembered in {known.path}:{known.line}", file=sys.stderr)
    return True


def _fail_json(exc: TransferError) -> dict[str, object]:
    res = exc.result
    return res.to_json() if res is not None else {  # type: ignore[attr-defined]
        "ok": False, "error": exc.message}


def cmd_transfer(a: argparse.Namespace) -> int:
    from fallback.engine import transfer
    from fallback.known_hosts import CertificateChanged, CertificateNotTrusted
    from fallback.progress import ProgressPrinter

    _setup_logging(a.verbose, a.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if a.quiet else "default")
        # "default" would also show ResourceWarnings from the event loop's teardown
        # after a failed TLS handshake, and the --insecure warning is printed below
        # as one plain line, not a second time with a source location.
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.filterwarnings("ignore", message="--insecure", category=UserWarning)
        user, password = _credentials(a)
        opts_kw = dict(transport=a.transport, streams=a.streams, resume=a.resume,
                       overwrite=a.overwrite, cacert=a.cacert, fingerprint=a.fingerprint,
                       insecure=a.insecure, user=user, password=password, encrypt=a.encrypt,
                       decrypt=a.decrypt, fsync=not a.no_fsync, target_rate=a.target_rate,
                       min_rate=a.min_rate, policy=a.policy,
                       block_size=_block_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE)
        if a.insecure and not a.quiet:
            print("warning: --insecure: the server certificate is not verified", file=sys.stderr)
        if a.encrypt or a.decrypt:
            opts_kw["passphrase"] = _passphrase(confirm=a.encrypt)
        for attempt in (1, 2):
            printer = None if a.quiet else ProgressPrinter(sys.stderr)
            try:
                result = transfer(a.src, a.dst, progress=printer, **opts_kw)
                break
            except TransferError as exc:
                if printer:
                    printer.close()
                # The engine raises TransferError "from None": the transport error it
                # translated stays its __context__ (PEP 415), with the certificate facts.
                cause = exc.__context__
                if isinstance(cause, CertificateNotTrusted | CertificateChanged):
                    if not a.quiet and _offer_trust(cause, a) and attempt == 1:
                        continue  # remembered: once more, pinned by it
                if a.json:
                    print(json.dumps(_fail_json(exc)))
                print(f"error: {exc.message}", file=sys.stderr)
                return EXIT_AUTH if exc.status == 401 else EXIT_FAILED
            finally:
                if printer:
                    printer.close()
    if a.json:
        print(json.dumps(result.to_json()))
    elif not a.quiet:
        print(f"{result.direction} ok: {result.files} files, {result.bytes} bytes "
              f"({result.sent_bytes} sent, {result.skipped_bytes} skipped) in "
              f"{result.seconds:.2f} s, {result.rate_mbps:.1f} Mbit/s over "
              f"{','.join(result.transports)}")
        if result.verified != "full":
            n = len(result.verified_files)
            print(f"verification sampled for {n} file{'s' if n != 1 else ''}: the resume trusted "
                  "blocks kept from an earlier run without comparing them with the source "
                  "(--resume full compares every one)")
    return EXIT_OK


DEFAULT_CONFIGS = (Path("/etc/fallback/aspera.conf"),)
"""Searched in order when ``serve`` has no ``--config``, then the user config folder's."""


def _default_config() -> tuple[Path | None, list[Path]]:
    """The first existing default config file, and every place that was looked at."""
    from fallback.known_hosts import config_dir

    places = [*DEFAULT_CONFIGS, config_dir() / "aspera.conf"]
    return next((p for p in places if p.is_file()), None), places


def _overrides(config: Config, a: argparse.Namespace) -> Config:
    """``--bind``, ``--http-port``, ``--https-port``, ``--udp-port`` over the config's values;
    a port given on the command line also enables its scheme."""
    import dataclasses
    from types import MappingProxyType

    from fallback.confxml import _Bad, _host

    changes: dict[str, Any] = {}
    sources = dict(config.sources)
    if a.bind is not None:
        try:
            changes["bind_address"] = _host("--bind", a.bind, Path.cwd())
        except _Bad as exc:
            raise UsageError(str(exc)) from None
        sources["http_server.bind_address"] = "command line"
    for opt, attr, key, enable in (("http_port", "http_port", "http_server.http_port",
                                    "enable_http"),
                                   ("https_port", "https_port", "http_server.https_port",
                                    "enable_https"),
                                   ("udp_port", "bind_udp_port",
                                    "transfer.protocol_options.bind_udp_port", None)):
        value = getattr(a, opt)
        if value is not None:
            changes[attr] = value
            sources[key] = "command line"
            if enable:
                changes[enable] = True
                sources[f"http_server.{enable}"] = "command line"
    if not changes:
        return config
    return dataclasses.replace(config, sources=MappingProxyType(sources), **changes)


def cmd_serve(a: argparse.Namespace) -> int:
    from fallback.config import ConfigError, embedded_defaults, load_config
    from fallback.daemon import serve

    path, places = (Path(a.config), []) if a.config else _default_config()
    if path is not None:
        try:
            config = load_config(path)
        except ConfigError as exc:
            for p in exc.problems:
                print(p, file=sys.stderr)
            return EXIT_USAGE
        how = "" if a.config else " (found in a default location; --config FILE for another)"
        print(f"config {config.path}{how}", flush=True)
    else:
        from fallback.auth import hash_password

        pw = os.environ.get("FALLBACK_PASSWORD")
        shown = pw is None
        if pw is None:
            import secrets

            pw = secrets.token_urlsafe(12)
        config = embedded_defaults(Path.cwd(), hash_password(pw))
        if a.docroot:
            import dataclasses

            root = Path(a.docroot).resolve()
            config = dataclasses.replace(config, default_docroot=root, users=tuple(
                dataclasses.replace(u, docroot=root) for u in config.users))
        print(f"embedded defaults: user demo, password "
              f"{pw if shown else '(from FALLBACK_PASSWORD)'}", flush=True)
        print(f"no config file (looked for {', '.join(map(str, places))}): loopback only, "
              f"state in {config.state_dir}", flush=True)
    return serve(_overrides(config, a), a.verbose)

def cmd_checksum(a: argparse.Namespace) -> int:
    from transport.blocks.digest import digest_path

    bs = parse_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE
    rc = 0
    for f in a.files:
        try:
            print(f"{digest_path(f, bs)}  {f}")
        except OSError as exc:
            print(f"error: {f}: {exc.strerror}", file=sys.stderr)
            rc = 1
    return rc


def cmd_crypt(a: argparse.Namespace) -> int:
    from transport.blocks import envelope as env

    src = Path(a.src)
    if a.cmd == "encrypt":
        dst = Path(a.dst) if a.dst else src.with_name(src.name + env.SUFFIX)
    else:
        dst = Path(a.dst) if a.dst else src.with_name(src.name.removesuffix(env.SUFFIX))
        if dst == src:
            raise UsageError("give an output path (the input has no .fallback-env suffix)")
    if not a.dst and not a.force and (dst.exists() or dst.is_symlink()):
        raise UsageError(f"{dst} exists: name the output (fallback {a.cmd} SRC DST) or "
                         "pass --force to replace it")
    if a.cmd == "encrypt":
        bs = parse_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE
        env.encrypt_file(src, dst, _passphrase(confirm=True), block_size=bs)
    else:
        try:
            env.decrypt_file(src, dst, _passphrase(confirm=False))
        except TransportError as exc:
            if exc.status == 403:
                raise TransferError(f"File decryption error, bad passphrase: {src}") from None
            raise TransferError(f"{src}: {exc.message}") from None
    print(dst)
    return EXIT_OK

def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: a receiver holds two descriptors
    (partial file and journal) per file of a folder being moved, and the usual soft
    limit of 1024 would fail a folder of 500 files. (Windowing files is the full fix.)"""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fallback")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH), not installed
        from fallback import __version__

        return __version__


def _dispatch(a: argparse.Namespace, parsers: dict[str, Parser]) -> int:
    if a.version:
        print(f"fallback {_version()}")
        return EXIT_OK
    if a.cmd == "transfer":
        return cmd_transfer(a)
    if a.cmd == "serve":
        return cmd_serve(a)
    if a.cmd == "demo":
        from fallback.demo import run_demo

        return run_demo(parse_size(a.size), a.streams)
    if a.cmd == "config":
        if a.config_cmd != "validate":
            parsers["config"].print_help(sys.stderr)
            return EXIT_USAGE
        from fallback.config import validate_main

        return validate_main(a.file, sys.stdout, sys.stderr)
    if a.cmd == "hash-password":
        from fallback.auth import hash_password_main

        return hash_password_main(sys.stdin, sys.stdout, sys.stderr)
    if a.cmd == "checksum":
        return cmd_checksum(a)
    if a.cmd in ("encrypt", "decrypt"):
        return cmd_crypt(a)
    parsers[""].print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see ``fallback --help``)."""
    _raise_fd_limit()
    args = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in args

    def fail(message: str, code: int) -> int:
        if wants_json:
            print(json.dumps({"ok": False, "error": message}))
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        a, parsers = parse(args)
    except ArgsError as exc:
        sys.stderr.write(exc.usage)
        if wants_json:
            print(json.dumps({"ok": False, "error": exc.message}))
        print(f"{exc.prog}: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        return _dispatch(a, parsers)
    except FallbackError as exc:
        return fail(exc.message, exc.exit_code)
    except TransportError as exc:
        return fail(exc.message, EXIT_FAILED)
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_FAILED)
    except KeyboardInterrupt:
        # cmd_transfer closed the live progress bar already, which ends its line.
        if wants_json:
            print(json.dumps({"ok": False, "error": "interrupted"}))
        print("interrupted: partial files are kept; run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED

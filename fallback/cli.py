"""The ``fallback`` command line (the parser and help texts: ``fallback.cliargs``).

Exit codes (a public contract, only ever added to): 0 success, 1 the transfer (or
daemon) failed, 2 bad usage or bad config, 3 the daemon refused the credentials
(HTTP 401, or 429 for a login throttled after failed ones) or the proxy its credentials
(407), 130 interrupted by Ctrl-C, 143 terminated by SIGTERM. With ``--json`` the last line of standard
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
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fallback.cliargs import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ArgsError,
    Parser,
    parse,
)
from fallback.clisources import STDIO, Job
from fallback.errors import FallbackError, TransferError, UsageError
from fallback.progress import printable
from fallback.remote import is_url, redacted
from fallback.summary import SKIPPED_LISTED, summary  # noqa: F401 - re-exported
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.errors import BadPassphrase, ErrorKind, TransportError

if TYPE_CHECKING:
    from fallback.client.options import Options
    from fallback.config import Config
    from fallback.result import TransferResult


def parse_size(text: str) -> int:
    from fallback.client.sizes import parse_size as parse

    return parse(text, "size")


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
                text = printable(record.getMessage())  # names from disk or daemon: escaped
                if record.exc_info:
                    text += "\n" + logging.Formatter().formatException(record.exc_info)
                print(f"{record.levelname.lower()}: {text}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - logging must never break a transfer
                self.handleError(record)

    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG)
    for name in ("fallback.client", "fallback.udp"):  # the UDP path's pump logs as the latter
        logger = logging.getLogger(name)
        logger.handlers[:] = [Stderr()]
        logger.propagate = False
        logger.setLevel(level)


def _credentials(a: argparse.Namespace, ends: list[str]) -> tuple[str | None, str | None]:
    """User and password for the transfer's URL, in the documented order (see
    ``fallback.credentials``), ending with a prompt on a terminal (as scp does). Several
    URLs (several remote sources) share the first one's host and credentials."""
    from fallback.credentials import resolve
    from fallback.remote import is_url, parse_url

    urls = [x for x in ends if is_url(x)]
    if not urls:
        return a.user, None  # the engine says what is wrong with the ends
    url = parse_url(urls[0])
    creds = resolve(url.host, a.user or url.user, url.password, password_file=a.password_file)
    pw, source = creds.password, creds.source
    if pw is None and creds.user and sys.stdin.isatty() and STDIO not in ends[:-1]:
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


def cmd_transfer(a: argparse.Namespace) -> int:
    from fallback.clisources import plan_jobs, read_file_list, with_port

    for flag in ("file_list", "src_base", "password_file", "cacert", "fingerprint", "user",
                 "block_size", "proxy", "target_rate", "min_rate"):
        if getattr(a, flag) == "":  # an unset shell variable: never "the current folder"
            raise UsageError(f"--{flag.replace('_', '-')} is empty ('')")
    positional = list(a.paths)
    listed = read_file_list(a.file_list) if a.file_list is not None else []
    if not listed and len(positional) < 2:
        raise UsageError("give SRC... DST (or --file-list FILE DST)")
    dst = with_port(positional[-1], a.port)
    sources = [with_port(x, a.port) for x in positional[:-1] + listed]
    jobs = plan_jobs(sources, dst, a.src_base)
    if dst == STDIO and a.json:
        raise UsageError("--json cannot share standard output with the file (- as DST)")
    if a.remove_after_transfer and jobs[0].src != STDIO and is_url(jobs[0].src):
        raise UsageError("--remove-after-transfer applies to uploads (the daemon does not "
                         "remove its files)")
    _setup_logging(a.verbose, a.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if a.quiet else "default")
        # "default" would also show ResourceWarnings from the event loop's teardown
        # after a failed TLS handshake, and the --insecure warning is printed below
        # as one plain line, not a second time with a source location.
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.filterwarnings("ignore", message="--insecure", category=UserWarning)
        user, password = _credentials(a, [*sources, dst])
        opts_kw = dict(transport=a.transport, streams=a.streams, resume=a.resume,
                       overwrite=a.overwrite, cacert=a.cacert, fingerprint=a.fingerprint,
                       insecure=a.insecure, user=user, password=password, encrypt=a.encrypt,
                       decrypt=a.decrypt, fsync=not a.no_fsync, target_rate=a.target_rate,
                       min_rate=a.min_rate, policy=a.policy, udp_port=a.udp_port,
                       symbolic_links=a.symbolic_links, filters=tuple(a.filters or ()),
                       dry_run=a.dry_run, proxy=a.proxy,
                       fallback=not a.no_fallback, fallback_port=a.fallback_port,
                       connect_timeout=a.connect_timeout, retries=a.retries,
                       retry_timeout=a.retry_timeout, udp_probe_timeout=a.udp_probe_timeout,
                       udp_lost_after=a.udp_lost_after,
                       block_size=_block_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE)
        if a.datagram_size is not None:
            opts_kw["datagram_size"] = a.datagram_size
        if a.insecure and not a.quiet:
            print("warning: --insecure: the server certificate is not verified", file=sys.stderr)
        if a.encrypt or a.decrypt:
            opts_kw["passphrase"] = _passphrase(confirm=a.encrypt)
        from fallback.engine import Options

        opts = Options.from_keywords(None, opts_kw, flags=True)  # UsageError: nothing attempted
        from transport.udp.sockopt import BULK_MMAP_THRESHOLD, tune_malloc

        tune_malloc(BULK_MMAP_THRESHOLD)  # block reads and stream chunks reuse the heap
        return _run_jobs(a, jobs, opts)


def _run_jobs(a: argparse.Namespace, jobs: list[Job], opts: Options) -> int:
    """Run each job in turn (a failed one does not stop the others, as scp goes on; a
    refused login or certificate does), then print one merged result."""
    import time

    from fallback.clisources import merge

    t0 = time.monotonic()
    done: list[tuple[Job, TransferResult]] = []
    code = EXIT_OK
    for k, job in enumerate(jobs):
        if len(jobs) > 1:
            logging.getLogger("fallback.client").info("source %d of %d: %s", k + 1, len(jobs),
                                                      redacted(job.src))
        try:
            res, rc = _run_one(a, job, opts)
        except KeyboardInterrupt as exc:  # what every job did so far, for --json (main)
            part = getattr(exc, "result", None)
            if part is not None:
                done.append((job, part))
                merged = merge(done, time.monotonic() - t0)
                merged.ok, merged.error = False, part.error
                exc.result = merged  # type: ignore[attr-defined]
            raise
        done.append((job, res))
        if rc != EXIT_OK:
            code = rc
            if rc == EXIT_AUTH or (res.error or "").startswith("TLS"):
                break
    result = merge(done, time.monotonic() - t0)
    if a.json:
        print(json.dumps(result.to_json()))
    if code != EXIT_OK:
        if len(jobs) > 1:
            failed = [redacted(j.src) for j, r in done if not r.ok]
            print(printable(f"error: {len(failed)} of {len(jobs)} sources failed: "
                            f"{', '.join(failed)}"), file=sys.stderr)
        return code
    if not a.quiet and not a.json:
        out = sys.stderr if jobs[0].dst == STDIO else sys.stdout
        for line in summary(result):
            print(line, file=out)
    return EXIT_OK


def _run_one(a: argparse.Namespace, job: Job, opts: Options) -> tuple[TransferResult, int]:
    """One transfer (``-`` as either end handled here), with the trust-on-first-use retry;
    failures are printed and returned as an exit code with the result so far."""
    from contextlib import ExitStack

    from fallback.clisources import copy_to_stdout, spool_stdin, stdout_target
    from fallback.engine import transfer
    from fallback.known_hosts import CertificateChanged, CertificateNotTrusted
    from fallback.progress import ProgressPrinter
    from fallback.result import TransferResult

    with ExitStack() as stack:
        src, dst, stdio = job.src, job.dst, None
        if src == STDIO:
            src, dst = stack.enter_context(spool_stdin(dst, sys.stdin.buffer))
            stdio = "stdin"
        elif dst == STDIO:
            dst, stdio = stack.enter_context(stdout_target()), "stdout"
        elif job.prefix and not is_url(dst) and not opts.dry_run:
            # --src-base: the source's folders below DST (DST itself: its last level only)
            if Path(dst).parents[len(job.prefix.split("/"))].is_dir():
                Path(dst).mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            printer = None if a.quiet else ProgressPrinter(sys.stderr)
            try:
                result = transfer(src, dst, opts, printer)
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
                print(f"error: {printable(exc.message)}", file=sys.stderr)
                res = exc.result if isinstance(exc.result, TransferResult) else \
                    TransferResult(error=exc.message)
                refused = exc.status in (401, 407) or exc.kind is ErrorKind.UNAUTHORIZED  # throttled
                return res, EXIT_AUTH if refused else EXIT_FAILED
            finally:
                if printer:
                    printer.close()
        result.stdio = stdio
        if stdio == "stdout" and not opts.dry_run:
            try:
                copy_to_stdout(dst, sys.stdout.buffer)  # only after the copy was verified
            except BrokenPipeError:  # `| head`: the reader left; say so once, exit 1
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                print("error: standard output closed before the end of the file",
                      file=sys.stderr)
                return result, EXIT_FAILED
        if a.remove_after_transfer and not opts.dry_run and stdio is None:
            _remove_sources(job, result)
        return result, EXIT_OK


def _remove_sources(job: Job, result: TransferResult) -> None:
    """``--remove-after-transfer``: delete each local source file whose copy the daemon
    verified (it is in ``checksums``); skipped and failed files stay, and so do folders."""
    base = os.path.dirname(os.path.abspath(job.src))
    for name in result.checksums:
        path = os.path.join(base, *name.split("/"))
        try:
            os.unlink(path)
            result.removed.append(name)
        except OSError as exc:
            print(printable(f"warning: cannot remove {path}: {exc.strerror or exc}"),
                  file=sys.stderr)


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

    from fallback.confxml import _Bad, _bind_host

    changes: dict[str, Any] = {}
    sources = dict(config.sources)
    if a.bind is not None:
        try:
            changes["bind_address"] = _bind_host("--bind", a.bind, Path.cwd())
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
    if getattr(a, "no_udp", False):
        if a.udp_port is not None:  # never one flag silently ignored for another
            raise UsageError("--udp-port and --no-udp contradict each other: give one")
        changes["enable_udp"] = False
    if not changes:
        return config
    return dataclasses.replace(config, sources=MappingProxyType(sources), **changes)


def cmd_serve(a: argparse.Namespace) -> int:
    from fallback.config import ConfigError, embedded_defaults, load_config
    from fallback.daemon import serve

    for flag in ("config", "docroot", "bind"):  # '' would silently mean the default
        if getattr(a, flag) == "":
            raise UsageError(f"--{flag} is empty ('')")

    path, places = (Path(a.config), []) if a.config else _default_config()
    if path is not None:
        if a.docroot:  # never silently ignored: docroots of a config file are its own
            raise UsageError(f"--docroot applies only without a config file; {path} gives "
                             "the docroots (<file_system>/<docroot>, <user>/<docroot>)")
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
    if "" in a.files:
        raise UsageError("a file name is empty ('')")
    for f in a.files:
        try:
            print(f"{digest_path(f, bs)}  {printable(f)}")
        except OSError as exc:
            print(f"error: {printable(f)}: {exc.strerror}", file=sys.stderr)
            rc = 1
    return rc


def cmd_crypt(a: argparse.Namespace) -> int:
    from transport.blocks import envelope as env

    if a.src == "" or a.dst == "":
        raise UsageError(f"the {'input' if a.src == '' else 'output'} path is empty ('')")
    if a.dst == STDIO:  # standard output, as `fallback transfer URL -`: written once verified
        import tempfile

        from fallback.clisources import copy_to_stdout

        with tempfile.TemporaryDirectory(prefix="fallback-stdout-") as tmp:
            a.dst = os.path.join(tmp, "out")
            _crypt(a, env)
            try:
                copy_to_stdout(tmp, sys.stdout.buffer)
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise TransferError("standard output closed before the end of the file") from None
        return EXIT_OK
    print(_crypt(a, env))
    return EXIT_OK


def _crypt(a: argparse.Namespace, env: Any) -> Path:
    """``fallback encrypt|decrypt SRC [DST]``: the file written."""
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
            if isinstance(exc, BadPassphrase):
                raise TransferError(f"File decryption error, bad passphrase: {src}") from None
            raise TransferError(f"{src}: {exc.message}") from None
    return dst

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
        from fallback.configcheck import validate_main

        if not a.file:
            raise UsageError("the config file name is empty ('')")
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
    if threading.current_thread() is threading.main_thread():
        from fallback.client.interrupt import handle_terminate

        handle_terminate()  # this process is ours: SIGTERM ends a transfer as Ctrl-C does
    args = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in args

    def fail(message: str, code: int) -> int:
        if wants_json:
            print(json.dumps({"ok": False, "error": message}))
        print(f"error: {printable(message)}", file=sys.stderr)
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
        from fallback.client.session import os_message

        return fail(os_message(exc, "the destination"), EXIT_FAILED)
    except KeyboardInterrupt as exc:
        # cmd_transfer closed the live progress bar already, which ends its line.
        from fallback.client.interrupt import Terminated
        from fallback.result import TransferResult

        why = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if wants_json:  # every key of the contract, with what was done before the signal
            part = getattr(exc, "result", None)
            res = part if isinstance(part, TransferResult) else TransferResult()
            res.ok, res.error = False, why
            print(json.dumps(res.to_json()))
        if STDIO in args:  # spooled through a temporary folder, gone with the run
            print(f"{why}: standard input or output cannot be resumed; run it again",
                  file=sys.stderr)
        else:
            print(f"{why}: partial files are kept; run again to resume", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED

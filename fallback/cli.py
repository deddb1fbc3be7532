"""The ``fallback`` command line.

Exit codes (a public contract): 0 success, 1 the transfer (or daemon) failed,
2 bad usage or bad config. With ``--json`` the last line of standard output is
one JSON object whose keys are only ever added to, never renamed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import warnings
from pathlib import Path

from fallback.errors import FallbackError, TransferError, UsageError
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.plan import DEFAULT_RESUME, RESUME_MODES
from transport.errors import TransportError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fallback", description=(
        "Bulk file transfer with resumable, verified HTTP(S) streams (UDP path: coming in #4)."))
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", help="start a daemon on loopback, transfer a file up and down, report")
    d.add_argument("--size", default="256M", help="size of the generated file (default 256M)")
    d.add_argument("--streams", type=int, default=4)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="aspera.conf-style XML file (default: embedded loopback defaults)")
    s.add_argument("--docroot", help="docroot for the embedded defaults' demo user")
    s.add_argument("-v", "--verbose", action="store_true")

    t = sub.add_parser("transfer", help="copy SRC to DST; one of them is http(s)://[user@]host[:port]/path")
    t.add_argument("src")
    t.add_argument("dst")
    t.add_argument("--transport", default="auto", choices=["auto", "udp", "http", "https"])
    t.add_argument("--streams", type=int, default=4, help="parallel HTTP streams (default 4)")
    t.add_argument("--resume", default=DEFAULT_RESUME, choices=list(RESUME_MODES),
                   help="resume check (default full: every kept block compared with the source)")
    t.add_argument("--overwrite", default="diff", choices=["never", "always", "diff", "older"])
    t.add_argument("--cacert", help="CA certificate file to verify the daemon's certificate")
    t.add_argument("--fingerprint", help="pin the daemon's certificate by its SHA-256 fingerprint")
    t.add_argument("--insecure", action="store_true", help="do not verify the certificate (warns)")
    t.add_argument("--user", help="user name (else from the URL)")
    t.add_argument("--block-size", default=None, help="block size for uploads, e.g. 4M")
    t.add_argument("--encrypt", action="store_true",
                   help="encrypt at rest: passphrase from FALLBACK_FILEPASS or a prompt")
    t.add_argument("--decrypt", action="store_true", help="decrypt enveloped files on download")
    t.add_argument("--no-fsync", action="store_true", help="skip fsync of received data (faster, less durable)")
    t.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    t.add_argument("-q", "--quiet", action="store_true")
    t.add_argument("-v", "--verbose", action="store_true")

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    v = csub.add_parser("validate", help="check a config file and print every effective setting")
    v.add_argument("file")

    sub.add_parser("hash-password", help="read a password on stdin, print the value for <password_hash>")

    k = sub.add_parser("checksum", help="print the whole-file digest that transfers report")
    k.add_argument("files", nargs="+")
    k.add_argument("--block-size", default=None)

    for name, helptext in (("encrypt", "encrypt a local file into an envelope (no daemon)"),
                           ("decrypt", "decrypt a local envelope (no daemon)")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("src")
        e.add_argument("dst", nargs="?")
        if name == "encrypt":
            e.add_argument("--block-size", default=None, help="plaintext block size (default 4M)")
    return p


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


def cmd_transfer(a: argparse.Namespace) -> int:
    from fallback.engine import transfer
    from fallback.progress import ProgressPrinter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if a.quiet else "default")
        # "default" would also show ResourceWarnings from the event loop's teardown
        # after a failed TLS handshake, and the --insecure warning is printed below
        # as one plain line, not a second time with a source location.
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.filterwarnings("ignore", message="--insecure", category=UserWarning)
        opts_kw = dict(transport=a.transport, streams=a.streams, resume=a.resume,
                       overwrite=a.overwrite, cacert=a.cacert, fingerprint=a.fingerprint,
                       insecure=a.insecure, user=a.user, encrypt=a.encrypt, decrypt=a.decrypt,
                       fsync=not a.no_fsync,
                       block_size=_block_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE)
        if a.insecure and not a.quiet:
            print("warning: --insecure: the server certificate is not verified", file=sys.stderr)
        if a.encrypt or a.decrypt:
            opts_kw["passphrase"] = _passphrase(confirm=a.encrypt)
        printer = None if a.quiet else ProgressPrinter(sys.stderr)
        try:
            result = transfer(a.src, a.dst, progress=printer, **opts_kw)
        except TransferError as exc:
            if printer:
                printer.close()
            res = exc.result
            if a.json and res is not None:
                print(json.dumps(res.to_json()))  # type: ignore[attr-defined]
            elif a.json:
                print(json.dumps({"ok": False, "error": exc.message}))
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
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
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from fallback.config import ConfigError, embedded_defaults, load_config
    from fallback.daemon import serve

    if a.config:
        try:
            config = load_config(a.config)
        except ConfigError as exc:
            for p in exc.problems:
                print(p, file=sys.stderr)
            return 2
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
    return serve(config, a.verbose)


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
        bs = parse_size(a.block_size) if a.block_size else DEFAULT_BLOCK_SIZE
        env.encrypt_file(src, dst, _passphrase(confirm=True), block_size=bs)
    else:
        dst = Path(a.dst) if a.dst else src.with_name(src.name.removesuffix(env.SUFFIX))
        if dst == src:
            raise UsageError("give an output path (the input has no .fallback-env suffix)")
        try:
            env.decrypt_file(src, dst, _passphrase(confirm=False))
        except TransportError as exc:
            if exc.status == 403:
                raise TransferError(f"File decryption error, bad passphrase: {src}") from None
            raise TransferError(f"{src}: {exc.message}") from None
    print(dst)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    _raise_fd_limit()
    parser = _parser()
    a = parser.parse_args(argv)
    try:
        if a.cmd == "transfer":
            return cmd_transfer(a)
        if a.cmd == "serve":
            return cmd_serve(a)
        if a.cmd == "demo":
            from fallback.demo import run_demo

            return run_demo(parse_size(a.size), a.streams)
        if a.cmd == "config":
            if a.config_cmd != "validate":
                parser.parse_args(["config", "--help"])
                return 2
            from fallback.config import validate_main

            return validate_main(a.file, sys.stdout, sys.stderr)
        if a.cmd == "hash-password":
            from fallback.auth import hash_password_main

            return hash_password_main(sys.stdin, sys.stdout, sys.stderr)
        if a.cmd == "checksum":
            return cmd_checksum(a)
        if a.cmd in ("encrypt", "decrypt"):
            return cmd_crypt(a)
        parser.print_help()
        return 2
    except FallbackError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except TransportError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial files are kept; run again to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

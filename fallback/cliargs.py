"""The ``fallback`` command line's parser and its help texts (``fallback.cli`` runs the commands).

Every subcommand's ``--help`` says what it does, the URL form and default ports
where they apply, every option with its default, the environment it reads, the
exit codes and examples. An argparse error raises ``ArgsError`` instead of
exiting, so ``main`` can also print the JSON line ``--json`` promises, and an
unknown option is reported with the usage of the subcommand it was given to.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, NoReturn

from transport.blocks.plan import DEFAULT_RESUME, RESUME_MODES

__all__ = ["EXIT_AUTH", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "ArgsError",
           "build_parser", "parse"]

# Exit codes: a public contract (codes are added, never changed).
EXIT_OK = 0
EXIT_FAILED = 1  # the transfer (or the daemon) failed; partials are kept
EXIT_USAGE = 2  # bad usage or bad config; nothing was attempted
EXIT_AUTH = 3  # the daemon refused the user name or password (HTTP 401)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): timeout, kill, a service stop

EXIT_STATUS = """\
exit status:
  0    success
  1    the transfer failed (partial files are kept: run the same command again to
       resume); with several sources, any of them (the others still ran); also an
       untrusted or changed TLS certificate
  2    bad usage or bad configuration (nothing was attempted)
  3    the daemon refused the user name or password, or the proxy its
       credentials (HTTP 407)
  130  interrupted (Ctrl-C); partial files are kept
  143  terminated (SIGTERM: timeout, kill, a service stop); as 130"""

URLS = """\
URL form:
  http://[USER[:PASSWORD]@]HOST[:PORT]/PATH     default port 8080
  https://[USER[:PASSWORD]@]HOST[:PORT]/PATH    default port 8443
  PATH is inside USER's docroot. An http:// URL is used as plain HTTP and an
  https:// one as HTTPS; --transport http|https switches to the daemon's port
  for that scheme (and says so)."""

TRANSFER_ENV = """\
environment:
  FALLBACK_PASSWORD     the password, when not in the URL or --password-file.
                        Order: URL password, --password-file, FALLBACK_PASSWORD,
                        ~/.netrc (machine HOST login USER password SECRET), and
                        on a terminal a prompt.
  FALLBACK_FILEPASS     the passphrase for --encrypt / --decrypt (else a prompt)
  FALLBACK_CONFIG_DIR   where known_hosts is kept (default ~/.config/fallback)
  TMPDIR                where '-' keeps standard input, or the file for
                        standard output, until it is verified (default /tmp)
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY (or lower case)
                        the proxy for https:// and http:// daemons
                        (http://[USER:PASSWORD@]HOST:PORT: CONNECT for HTTPS,
                        forwarding for HTTP, Basic proxy authentication), and
                        the hosts reached directly; --proxy overrides the first
                        two. A proxy carries no UDP."""

TRUST = """\
certificates:
  With none of --cacert, --fingerprint, --insecure, the daemon's certificate must
  be signed by a CA the system trusts, or be remembered in
  ~/.config/fallback/known_hosts. A self-signed one (what the daemon generates) is
  refused with its SHA-256 fingerprint; on a terminal fallback asks whether to
  trust it and remembers the answer (as ssh does). A remembered certificate that
  changes is refused, naming the file and line to edit."""

TRANSFER_EXAMPLES = """\
examples:
  fallback transfer big.iso https://alice@xfer.example:8443/incoming/
  fallback transfer https://alice@xfer.example/incoming/big.iso ./ --cacert cert.pem
  fallback transfer ./project/ https://alice@xfer.example/backup/ --streams 8 --json
  fallback transfer f.bin http://alice@127.0.0.1:8080/in/ --password-file ~/.fbpass
  fallback transfer secret.tar https://alice@xfer.example/vault/ --encrypt
  fallback transfer *.iso notes/ https://alice@xfer.example/in/ -P 9443 -l 200M -k 1
  fallback transfer https://alice@xfer.example/in/a.iso https://alice@xfer.example/in/b.iso ./
  tar c dir | fallback transfer - https://alice@xfer.example/in/dir.tar
  fallback transfer https://alice@xfer.example/in/f.iso - | sha256sum
  fallback transfer --file-list list.txt --src-base /data https://alice@xfer.example/in/"""

STDIO_TEXT = """\
standard input and output (-):
  fallback transfer - https://host/in/name   reads standard input into a temporary
      file, then uploads it as 'name' (DST must name the file) and verifies the
      stored copy against that spool: "stdio": "stdin" in --json. Nothing resumes
      across runs (standard input cannot be read twice).
  fallback transfer https://host/in/f.iso -  downloads the file into a temporary
      folder, verifies it in full, and only then writes it to standard output
      (nothing is written if it fails); progress and summary go to stderr;
      --json is refused (it would share stdout with the data)."""

LINKS_TEXT = """\
symbolic links (--symbolic-links, uploads; a source named on the command line is
  always followed and lands under its own name, as cp does):
  follow      (default) a link to a file is sent as that file when its target
              is inside the source folder; one leading outside it (e.g. to
              /etc/passwd) is skipped and reported
  follow-all  every link to a file is sent as that file (ascp's follow)
  skip        no link is sent
  Links to folders are never followed, dangling links cannot be; every link not
  sent is listed in skipped_files with the reason. (ascp's copy, storing the
  link itself, is not offered: the daemon stores no links.)"""

FILTERS_TEXT = """\
filters (-N PATTERN / -E PATTERN, as ascp):
  Rules are tried in the order given; the first that matches a file or folder
  decides (-N includes, -E excludes); one no rule matches is included. An
  excluded folder takes its contents along. * and ? do not match /, ** does; a
  pattern without / matches names at any depth, /a/b is anchored at the source,
  a trailing / matches folders only. Only .txt files at any depth:
  -N '*/' -N '*.txt' -E '*'. Excluded names are listed in skipped_files."""

JSON_KEYS = """\
--json: the last line of standard output is one JSON object (keys are added,
  never renamed): ok, transports, files, bytes, sent_bytes, skipped_bytes,
  seconds, rate_mbps (Mbit/s of sent_bytes over seconds; 0 when nothing was sent),
  checksums, error, direction, skipped_files, content, verified, verified_files,
  retransmitted_bytes, loss_pct, rtt_ms, hole_bytes, dry_run, would_transfer, stdio,
  stored_as (--encrypt: name -> envelope name), removed, transport_reason (why the
  first transport), switches (each move to another transport: {"at": seconds,
  "from", "to", "reason"}), proxy (its http://host:port, or null), retries
  (re-connections), udp_reason (why UDP is not carrying the blocks at the end:
  timeout, unreachable, refused by server config, a proxy, lost, degraded; "" when
  it is). transports is empty when nothing was sent; in order of use, e.g.
  ["https", "udp", "https", "udp"] with --transport auto.
  On a usage error it is {"ok": false, "error": "..."}."""

SERVE_TEXT = """\
config file:
  --config FILE, else /etc/fallback/aspera.conf, else
  ~/.config/fallback/aspera.conf (FALLBACK_CONFIG_DIR), whichever exists first;
  without any, embedded defaults: loopback only (127.0.0.1), HTTP 8080 and HTTPS
  8443, ./fallback-data for the docroot, state and a self-signed certificate,
  one user "demo". The start-up lines say which file was used, where the
  certificate is (for clients' --cacert) and its fingerprint.
  Relative paths in the file (state_dir, docroot, cert_file) are relative to
  the file's folder. Reference: docs/config.md.

signals:
  SIGHUP reloads the config (ports change only on restart); SIGTERM or Ctrl-C
  checkpoints every transfer and exits 0.

environment:
  FALLBACK_PASSWORD     the demo user's password with embedded defaults
                        (else one is generated and printed)
  FALLBACK_CONFIG_DIR   the user config folder searched for aspera.conf

exit status:
  0  stopped by SIGTERM/SIGINT   1  cannot listen   2  bad config or certificate

examples:
  fallback serve
  fallback serve --config /etc/fallback/aspera.conf
  fallback serve --bind 0.0.0.0 --https-port 9443"""


class ArgsError(Exception):
    """An argparse error in (sub)command ``prog``; ``usage`` is that command's usage."""

    def __init__(self, message: str, prog: str, usage: str) -> None:
        super().__init__(message)
        self.message, self.prog, self.usage = message, prog, usage


class Parser(argparse.ArgumentParser):
    """Raises ``ArgsError`` rather than printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ArgsError(message, self.prog, self.format_usage())


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends each option's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" not in text and default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{n} is out of range 1-65535")
    return n


def _resume_level(text: str) -> str:
    """``-k 0..3`` (ascp's resume levels) as a ``--resume`` mode."""
    levels = {"0": "none", "1": "attrs", "2": "sparse", "3": "full"}
    if text not in levels:
        raise argparse.ArgumentTypeError(f"-k takes 0, 1, 2 or 3, not {text!r}")
    return levels[text]


class _Rule(argparse.Action):
    """``-N``/``-E``: rules kept in the order given, as ``("include"|"exclude", pattern)``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        rules = list(getattr(namespace, self.dest, None) or [])
        rules.append(("include" if option_string == "-N" else "exclude", str(values)))
        setattr(namespace, self.dest, rules)


def _sub(sub: Any, name: str, help: str, description: str, epilog: str = "") -> Parser:
    p: Parser = sub.add_parser(name, help=help, description=textwrap.fill(description, 79),
                               epilog=epilog, formatter_class=_Formatter)
    return p


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and every (sub)command's parser by name (``config validate``)."""
    p = Parser(prog="fallback", formatter_class=_Formatter, description=(
        "Bulk file transfer over UDP (port 33001, with its own rate control) or, where "
        "UDP cannot pass, resumable parallel HTTP(S) streams; every file verified."), epilog=EXIT_STATUS + "\n\nRun 'fallback COMMAND --help' "
        "for a command's options, environment and examples.")
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    parsers: dict[str, Parser] = {"": p}

    d = _sub(sub, "demo", "start a daemon on loopback, transfer a file up and down, report",
             "Start a daemon on 127.0.0.1 with a temporary config (ports 8080/8443/33001 "
             "when free), send a generated file up and back down over UDP, over HTTPS and "
             "over HTTP, verify every copy and print transport, size, time and rate side "
             "by side.",
             "examples:\n  fallback demo\n  fallback demo --size 1G --streams 8")
    d.add_argument("--size", default="256M", help="size of the generated file")
    d.add_argument("--streams", type=int, default=4, help="parallel HTTP(S) streams")
    parsers["demo"] = d

    s = _sub(sub, "serve", "run the daemon",
             "Serve each user's docroot over HTTP and HTTPS (one port or two) to "
             "`fallback transfer` and to plain HTTP clients (curl, aria2c).", SERVE_TEXT)
    s.add_argument("--config", metavar="FILE", help="aspera.conf-style XML file "
                   "(default: the first of /etc/fallback/aspera.conf and the user config "
                   "folder's aspera.conf that exists, else embedded loopback defaults)")
    s.add_argument("--docroot", help="docroot of the embedded defaults' demo user "
                   "(default ./fallback-data/docroot)")
    s.add_argument("--bind", metavar="ADDRESS", help="listen address, overriding "
                   "<bind_address> (0.0.0.0: every IPv4 address)")
    s.add_argument("--http-port", type=_port, metavar="PORT",
                   help="HTTP port, overriding <http_port> (and enabling HTTP)")
    s.add_argument("--https-port", type=_port, metavar="PORT",
                   help="HTTPS port, overriding <https_port> (and enabling HTTPS)")
    s.add_argument("--udp-port", type=_port, metavar="PORT",
                   help="UDP port, overriding <bind_udp_port>")
    s.add_argument("--no-udp", action="store_true",
                   help="serve HTTP(S) only: no UDP path (clients on auto use HTTP(S))")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parsers["serve"] = s

    t = _sub(sub, "transfer", "copy SRC... to DST; one end is http(s)://[user@]host[:port]/path",
             "Copy files and folders between local paths and a daemon, resumably and "
             "verified. Either every SRC is local and DST a URL (an upload), or every SRC "
             "a URL and DST local (a download); several sources (what a shell glob gives) "
             "go into the folder DST. A trailing / on DST means 'into this folder'; "
             "otherwise an existing folder is entered and anything else is the new name "
             "(as cp -r). A download creates only the last level of DST (DST/ in an "
             "existing folder); a missing tree is refused, as cp and scp do. '-' as the "
             "only SRC reads standard input into the file DST names; '-' as DST writes one "
             "remote file to standard output.",
             "\n\n".join((URLS, TRUST, STDIO_TEXT, LINKS_TEXT, FILTERS_TEXT, TRANSFER_ENV,
                          JSON_KEYS, EXIT_STATUS, TRANSFER_EXAMPLES)))
    t.usage = "%(prog)s [options] SRC... DST"
    t.add_argument("paths", nargs="+", metavar="SRC... DST",
                   help="local paths or URLs; the last one is the destination")
    t.add_argument("-P", "--port", type=_port, metavar="PORT",
                   help="the daemon's port, replacing the URL's (as ascp -P)")
    t.add_argument("--file-list", metavar="FILE",
                   help="more sources, one per line (as ascp --file-list; - reads stdin)")
    t.add_argument("--src-base", metavar="PREFIX",
                   help="keep each source's folders below PREFIX at the destination "
                        "(as ascp --src-base): --src-base /data /data/a/b.txt DST/ gives DST/a/b.txt")
    t.add_argument("--transport", default="auto", choices=["auto", "udp", "http", "https"],
                   help="auto: HTTP(S) streams at once (the URL's scheme, or the daemon's "
                        "other one when the URL's cannot be reached; a folder of mostly small files "
                        "stays there, for bundles), moving to UDP when the "
                        "daemon's UDP path answers the probe, back to HTTP(S) when UDP is lost "
                        "or policed, and to UDP again when it answers; udp: UDP only (exit 1 "
                        "when it cannot); http/https: that scheme on the daemon's port for it, "
                        "never another")
    t.add_argument("--streams", type=int, default=4,
                   help="parallel HTTP streams (1-64; the daemon caps it with streams_max)")
    t.add_argument("-k", dest="resume", type=_resume_level, metavar="{0,1,2,3}",
                   default=argparse.SUPPRESS,
                   help="as ascp -k: 0 none, 1 attrs, 2 sparse, 3 full (same as --resume)")
    t.add_argument("--resume", default=DEFAULT_RESUME, choices=list(RESUME_MODES),
                   help="as ascp -k: none starts over; attrs resumes if size and mtime match; "
                        "sparse also checks sampled block digests; full checks every journaled "
                        "block against the source, so the result says verified: full "
                        "(default: full)")
    t.add_argument("--overwrite", default="diff", choices=["never", "always", "diff", "older"],
                   help="an existing target: never keep it; always replace it; diff skip it "
                        "when size and digest match; older replace only older targets")
    t.add_argument("--cacert", metavar="FILE", help="verify the daemon's certificate with this "
                   "CA (or the daemon's own cert.pem)")
    t.add_argument("--fingerprint", metavar="SHA256", help="pin the daemon's certificate by its "
                   "SHA-256 fingerprint, as the daemon prints it ('SHA256 AB:CD:...'), with or "
                   "without prefix and colons")
    t.add_argument("--insecure", action="store_true",
                   help="do not verify the certificate at all (warns)")
    t.add_argument("--user", help="user name, when not in the URL (else ~/.netrc's login)")
    t.add_argument("--password-file", metavar="FILE",
                   help="read the password from the first line of FILE")
    t.add_argument("--block-size", default=None, metavar="SIZE",
                   help="block size for uploads, 4K-64M (default 4M)")
    t.add_argument("--encrypt", action="store_true",
                   help="encrypt at rest: passphrase from FALLBACK_FILEPASS or a prompt")
    t.add_argument("--decrypt", action="store_true", help="decrypt enveloped files on download")
    t.add_argument("--no-fsync", action="store_true",
                   help="skip fsync of received data (faster, less durable)")
    t.add_argument("-O", "--udp-port", type=int, default=None, metavar="PORT",
                   help="UDP port to send to (default: the one the daemon names)")
    t.add_argument("-Z", "--datagram-size", type=int, default=None, metavar="BYTES",
                   help="UDP datagram size, as ascp -Z (default: path MTU discovery, from "
                        "1452 up to what the route carries, e.g. 8972 on jumbo frames)")
    t.add_argument("-l", "--target-rate", metavar="RATE", default=None,
                   help="cap the transfer at RATE bits/s, as ascp -l: 20M, 500K, 1G; a bare "
                        "number is Kbps (default: no cap; the server's own cap wins)")
    t.add_argument("-m", "--min-rate", metavar="RATE", default=None,
                   help="the rate the transfer keeps even when sharing (policy fair/low), "
                        "as --target-rate")
    t.add_argument("--policy", default="fair", choices=["fixed", "high", "fair", "low"],
                   help="bandwidth policy, as ascp --policy: fair (default) takes one TCP "
                        "flow's share when the link is shared, low only spare capacity, high "
                        "and fixed every stream up to the target rate (on UDP: the rate "
                        "controller's policy); the server's configured policy wins")
    t.add_argument("--symbolic-links", default="follow", choices=["follow", "follow-all", "skip"],
                   help="symlinks inside a source folder (see 'symbolic links' below)")
    t.add_argument("-N", dest="filters", action=_Rule, metavar="PATTERN",
                   help="include names matching PATTERN (as ascp -N; see 'filters' below)")
    t.add_argument("-E", dest="filters", action=_Rule, metavar="PATTERN",
                   help="exclude names matching PATTERN (as ascp -E)")
    t.add_argument("--remove-after-transfer", action="store_true",
                   help="uploads: delete each source file once its copy is verified (files "
                        "skipped as existing, and folders, stay)")
    t.add_argument("-p", "--preserve-times", action="store_true",
                   help="accepted for ascp; always on: every file keeps its mtime and "
                        "permission bits")
    t.add_argument("--dry-run", action="store_true",
                   help="list what would be moved and what not (asks the daemon, moves nothing)")
    t.add_argument("--proxy", metavar="URL", default=None,
                   help="reach the daemon through this HTTP proxy, as ascp -x: "
                        "http://[USER:PASSWORD@]HOST:PORT, or none for a direct connection "
                        "(default: HTTPS_PROXY/HTTP_PROXY, NO_PROXY)")
    t.add_argument("--no-fallback", action="store_true",
                   help="with --transport auto, never use the daemon's other scheme when the "
                        "URL's cannot be reached (HTTPS -> plain HTTP sends the password and "
                        "data unencrypted), nor leave UDP once on it (a lost UDP path fails)")
    t.add_argument("--fallback-port", metavar="PORT", type=_port, default=None,
                   help="the port of the daemon's other scheme, tried when the URL's cannot "
                        "be reached, as ascp -t (default: the daemon's /info once known, else "
                        "8080 for HTTP and 8443 for HTTPS when the URL uses its scheme's "
                        "default port)")
    t.add_argument("--connect-timeout", metavar="SECONDS", type=float, default=5.0,
                   help="seconds a connection to the daemon or the proxy may take")
    t.add_argument("--retries", metavar="N", type=int, default=10,
                   help="when every path is down once the transfer got under way: re-connect "
                        "and resume at most N times")
    t.add_argument("--retry-timeout", metavar="SECONDS", type=float, default=60.0,
                   help="when every path is down: stop retrying after this many seconds and "
                        "exit 1, partials kept (the next run resumes)")
    t.add_argument("--udp-probe-timeout", metavar="SECONDS", type=float, default=1.5,
                   help="--transport auto: seconds in all the UDP probe may take before "
                        "HTTP(S), which starts at once, goes on alone")
    t.add_argument("--udp-lost-after", metavar="SECONDS", type=float, default=2.0,
                   help="--transport auto: seconds without a word on the UDP path after which "
                        "the rest goes over HTTP(S) (with --no-fallback: the transfer fails)")
    t.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on the last line of stdout")
    t.add_argument("-q", "--quiet", action="store_true",
                   help="no progress and no summary; errors are still printed")
    t.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: transport chosen and why, streams, retries; -vv: every control call")
    parsers["transfer"] = t

    c = _sub(sub, "config", "configuration tools", "Configuration tools.",
             "examples:\n  fallback config validate /etc/fallback/aspera.conf")
    csub = c.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND", parser_class=Parser)
    v = _sub(csub, "validate", "check a config file and print every effective setting",
             "Check FILE and print every effective setting and where it came from (exit 0), "
             "or one line FILE:LINE: problem per problem (exit 2).",
             "examples:\n  fallback config validate aspera.conf")
    v.add_argument("file")
    parsers["config"], parsers["config validate"] = c, v

    parsers["hash-password"] = _sub(
        sub, "hash-password", "read a password on stdin, print the value for <password_hash>",
        "Read a password on standard input (one line) and print its Argon2id hash for "
        "<password_hash>.", "examples:\n  echo -n 'alice-secret' | fallback hash-password")

    k = _sub(sub, "checksum", "print the whole-file digest that transfers report",
             "Print the whole-file digest (b3blocks:<hex>) that transfers report in "
             "'checksums', for local files.", "examples:\n  fallback checksum big.iso")
    k.add_argument("files", nargs="+")
    k.add_argument("--block-size", default=None, metavar="SIZE",
                   help="block size the digest is computed over (default 4M)")
    parsers["checksum"] = k

    for name, helptext, desc in (
        ("encrypt", "encrypt a local file into an envelope (no daemon)",
         "Encrypt SRC into DST (default SRC.fallback-env) with a passphrase from "
         "FALLBACK_FILEPASS or a prompt."),
        ("decrypt", "decrypt a local envelope (no daemon)",
         "Decrypt the envelope SRC into DST (default: SRC without .fallback-env), with a "
         "passphrase from FALLBACK_FILEPASS or a prompt."),
    ):
        e = _sub(sub, name, helptext, desc,
                 "An existing default output is not replaced unless --force is given or "
                 "DST is named.\n\nexamples:\n"
                 + ("  fallback encrypt report.pdf" if name == "encrypt"
                    else "  fallback decrypt report.pdf.fallback-env\n"
                         "  fallback decrypt report.pdf.fallback-env copy.pdf"))
        e.add_argument("src")
        e.add_argument("dst", nargs="?", help="the output file; - for standard output "
                       "(written once the whole file is " + ("encrypted)" if name == "encrypt"
                                                             else "decrypted and verified)"))
        e.add_argument("--force", action="store_true", help="replace an existing default output")
        if name == "encrypt":
            e.add_argument("--block-size", default=None, metavar="SIZE",
                           help="plaintext block size (default 4M)")
        parsers[name] = e
    return p, parsers


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Parser]]:
    """Parse ``argv``; an unknown option is reported by the subcommand it was given to."""
    top, parsers = build_parser()
    a, extra = top.parse_known_args(argv)
    if extra and a.cmd == "transfer":
        # SRC --option VALUE DST: argparse leaves paths after an option over; they are paths
        # (as cp and scp take options anywhere), in the order given.
        paths = [x for x in extra if x == "-" or not x.startswith("-")]
        extra = [x for x in extra if x not in paths]
        a.paths = [*a.paths, *paths]
    if extra:
        key = " ".join(x for x in (a.cmd, getattr(a, "config_cmd", None)) if x)
        parsers.get(key, top).error(f"unrecognized arguments: {' '.join(extra)}")
    return a, parsers

"""Remembered daemon certificates: trust on first use, as ssh's ``known_hosts``.

Most daemons run with the self-signed certificate they generate, so no CA vouches
for them. Instead of a 95-character ``--fingerprint`` on every command, the CLI
shows the certificate's SHA-256 fingerprint once, asks (on a terminal only), and
remembers the answer in ``<config dir>/known_hosts``, one line per daemon::

    # host:port   algorithm  fingerprint
    xfer.example:8443 SHA256 6B:77:...:0F
    [::1]:8443 SHA256 01:23:...:EF

Later connections to that ``host:port`` (with no ``--cacert``, ``--fingerprint``
or ``--insecure``) pin the remembered fingerprint; a different certificate is a
loud refusal naming both fingerprints and the file and line to edit, never a
silent re-trust (ssh: "REMOTE HOST IDENTIFICATION HAS CHANGED").

The config dir is ``platformdirs.user_config_dir("fallback")`` (``~/.config/fallback``
on Linux), or ``$FALLBACK_CONFIG_DIR`` when set.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from fallback.tls import format_fingerprint, parse_fingerprint
from transport.errors import ConnectionLost, ErrorKind

__all__ = [
    "CONFIG_DIR_ENV",
    "CertificateChanged",
    "CertificateNotTrusted",
    "KnownHost",
    "config_dir",
    "host_key",
    "known_hosts_path",
    "lookup",
    "presented_fingerprint",
    "remember",
]

log = logging.getLogger("fallback.client")

CONFIG_DIR_ENV = "FALLBACK_CONFIG_DIR"


def config_dir() -> Path:
    """The user's config folder for fallback: ``$FALLBACK_CONFIG_DIR`` or the platform's."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("fallback"))


def known_hosts_path() -> Path:
    return config_dir() / "known_hosts"


def host_key(host: str, port: int) -> str:
    """``host:port`` as a known-hosts key; IPv6 literals in brackets, names in lower case."""
    h = host.lower().rstrip(".")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


@dataclass(frozen=True, slots=True)
class KnownHost:
    """One remembered certificate: ``fingerprint`` is ``AB:CD:...`` (SHA-256, 32 bytes)."""

    key: str
    fingerprint: str
    path: Path
    line: int


def lookup(host: str, port: int, path: Path | None = None) -> KnownHost | None:
    """The entry for ``host:port``, or None. A malformed line is skipped with a warning
    naming it (it would otherwise be silently ignored, as a typo in a pinned value)."""
    file = path or known_hosts_path()
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", file, exc.strerror or exc)
        return None
    want = host_key(host, port)
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[1].upper() != "SHA256":
            log.warning("%s:%d: expected 'host:port SHA256 AB:CD:...', skipped", file, n)
            continue
        if parts[0].lower() != want:
            continue
        try:
            digest = parse_fingerprint(parts[2])
        except ValueError as exc:
            log.warning("%s:%d: %s, skipped", file, n, exc)
            continue
        return KnownHost(want, format_fingerprint(digest), file, n)
    return None


def remember(host: str, port: int, fingerprint: str, path: Path | None = None) -> KnownHost:
    """Append ``host:port SHA256 <fingerprint>``; the folder is made 0700, the file 0600.

    Raises ``OSError`` when the file cannot be written, ``ValueError`` for a bad fingerprint.
    """
    file = path or known_hosts_path()
    fp = format_fingerprint(parse_fingerprint(fingerprint))
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        existing = file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        existing = ""
    lines = existing.splitlines()
    prefix = "" if not existing or existing.endswith("\n") else "\n"
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if not lines:
            f.write("# fallback known hosts: host:port SHA256 fingerprint (see `fallback transfer --help`)\n")
            lines = ["#"]
        f.write(f"{prefix}{host_key(host, port)} SHA256 {fp}\n")
    return KnownHost(host_key(host, port), fp, file, len(lines) + 1)


async def presented_fingerprint(host: str, port: int, timeout: float = 10.0) -> str | None:
    """SHA-256 fingerprint (``AB:CD:...``) of the certificate ``host:port`` presents, read
    over a TLS handshake that verifies nothing; None when that handshake fails too."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout)
    except (TimeoutError, OSError, ssl.SSLError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return format_fingerprint(hashlib.sha256(der).digest()) if der else None


class CertificateNotTrusted(ConnectionLost):
    """The daemon's certificate is signed by no trusted CA (typically: self-signed) and
    nothing pins it. ``presented`` is its fingerprint when it could be read."""

    kind = ErrorKind.UNTRUSTED  # the CLI maps it, like any transfer failure, to exit code 1

    def __init__(self, reason: str, *, host: str, port: int, presented: str | None) -> None:
        seen = f"; it presented SHA256 {presented}" if presented else ""
        super().__init__(f"TLS certificate not trusted: {reason}{seen}")
        self.host, self.port, self.presented = host, port, presented

    def hint(self) -> list[str]:
        """What to do, as ssh says it: the fingerprint, and the three ways to trust it."""
        where = host_key(self.host, self.port)
        if self.presented is None:
            return [f"hint: the certificate of {where} could not be read; trust it with "
                    "--fingerprint, --cacert FILE or (not recommended) --insecure"]
        return [
            f"The certificate of {where} has the SHA-256 fingerprint",
            f"    SHA256 {self.presented}",
            "Compare it with the one the daemon printed at start-up "
            "('certificate ... fingerprint SHA256 ...'). If it is the same, trust it with one of:",
            f"    --fingerprint 'SHA256 {self.presented}'",
            "    --cacert FILE   (the daemon's certificate file, named in its start-up lines)",
            "    --insecure      (no verification at all: not recommended)",
            "On a terminal, fallback offers to remember it (in "
            f"{known_hosts_path()}) so later commands need none of these.",
        ]


class CertificateChanged(ConnectionLost):
    """The daemon presented another certificate than the one remembered for it."""

    kind = ErrorKind.UNTRUSTED  # the CLI maps it, like any transfer failure, to exit code 1

    def __init__(self, known: KnownHost, presented: str | None) -> None:
        super().__init__(f"TLS certificate of {known.key} does not match the one remembered in "
                         f"{known.path}:{known.line}")
        self.known, self.presented = known, presented

    def hint(self) -> list[str]:
        k = self.known
        return [
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
            "@    WARNING: DAEMON CERTIFICATE HAS CHANGED!              @",
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
            "Someone could be intercepting the connection, or the daemon's certificate was",
            "replaced (a regenerated self-signed certificate, a new host name or address).",
            f"remembered: SHA256 {k.fingerprint}",
            f"presented:  SHA256 {self.presented or '(could not be read)'}",
            f"If the new certificate is the daemon's, delete line {k.line} of {k.path}",
            "and connect again (or pass --fingerprint / --cacert for this command).",
        ]

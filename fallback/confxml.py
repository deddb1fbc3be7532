"""Reading aspera.conf-style XML: elements with their line numbers, and value parsers.

Split from ``fallback.config`` so the schema and the loader read on their own.
Every parser takes (element name, stripped text, config folder) and raises
``_Bad`` with a user-facing message, which the loader pins to a ``FILE:LINE``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypeAlias
from xml.etree.ElementTree import ParseError
from xml.parsers.expat import ErrorString

from defusedxml import DefusedXmlException, EntitiesForbidden
from defusedxml.ElementTree import DefusedXMLParser

from fallback.auth import _Argon2Hash, _parse_hash, validate_hash

_MAX_BYTES = 8 * 1024 * 1024  # a config file this large is a mistake, not a configuration
_HASH_PREFIXES = ("$argon2id$", "$scrypt$")

@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, pinned to a line so editors can jump to it."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


# --------------------------------------------------------------------------- XML with lines


@dataclass(slots=True)
class _Node:
    tag: str
    attrib: dict[str, str]
    line: int
    children: list[_Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


class _LineTreeBuilder:
    """Parser target that records each start tag's line: the stock TreeBuilder drops positions,
    and every problem must name a line."""

    def __init__(self) -> None:
        self.expat: Any = None
        self.root: _Node | None = None
        self._stack: list[_Node] = []

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        node = _Node(tag, dict(attrib), int(self.expat.CurrentLineNumber))
        if self._stack:
            self._stack[-1].children.append(node)
        elif self.root is None:
            self.root = node
        self._stack.append(node)

    def end(self, tag: str) -> None:
        self._stack.pop()

    def data(self, text: str) -> None:
        if self._stack:
            self._stack[-1].text.append(text)

    def close(self) -> _Node | None:
        return self.root


def _parse_xml(data: bytes, file: str) -> _Node | Problem:
    builder = _LineTreeBuilder()
    parser = DefusedXMLParser(target=builder, forbid_entities=True, forbid_external=True)
    builder.expat = parser.parser
    try:
        parser.feed(data)
        parser.close()
    except ParseError as exc:
        line, column = exc.position
        return Problem(file, line, f"malformed XML: {ErrorString(exc.code)} (column {column + 1})")
    except DefusedXmlException as exc:
        line = int(builder.expat.CurrentLineNumber)
        if isinstance(exc, EntitiesForbidden):
            what = f"entity declaration <!ENTITY {exc.name}>"
        else:
            what = "external reference"
        why = "entities are not allowed (they enable expansion bombs and file/URL inclusion)"
        return Problem(file, line, f"{what} refused: {why}")
    assert builder.root is not None  # expat reports "no element found" otherwise
    return builder.root


# --------------------------------------------------------------------------- value parsers


class _Bad(Exception):
    """A value is wrong; the message is already user-facing."""


_Parse: TypeAlias = Callable[[str, str, Path], Any]  # (element name, stripped text, config dir)


def _q(text: str) -> str:
    return '"' + (text if len(text) <= 60 else text[:57] + "...") + '"'


def _int_range(lo: int, hi: int | None) -> _Parse:
    def parse(name: str, text: str, base: Path) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise _Bad(f"{name}: {_q(text)} is not an integer")
        n = int(text)
        if hi is None and n < lo:
            raise _Bad(f"{name}: {n} is out of range (must be {lo} or more)")
        if hi is not None and not lo <= n <= hi:
            raise _Bad(f"{name}: {n} is out of range {lo}-{hi}")
        return n

    return parse


_port = _int_range(1, 65535)
_BOOLS = {"true": True, "yes": True, "1": True, "on": True,
          "false": False, "no": False, "0": False, "off": False}


def _bool(name: str, text: str, base: Path) -> bool:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise _Bad(f"{name}: {_q(text)} is not a boolean (use true/false, yes/no, 1/0)") from None


def _choice(*allowed: str) -> _Parse:
    def parse(name: str, text: str, base: Path) -> str:
        if text.lower() not in allowed:
            raise _Bad(f"{name}: {_q(text)} is not one of {', '.join(allowed)}")
        return text.lower()

    return parse


_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(?:bps|b/s|b)?)?", re.IGNORECASE)
_SI = {"k": 3, "m": 6, "g": 9, "t": 12}


def _rate(name: str, text: str, base: Path) -> int:
    """Plain integers are Kbps (Aspera's unit); K/M/G/T-suffixed values are bits/s (SI)."""
    m = _RATE_RE.fullmatch(text)
    if m is None or (m[2] is None and "." in m[1]):
        raise _Bad(f"{name}: {_q(text)} is not a rate "
                   "(use Kbps, or bits/s with a K/M/G suffix, e.g. 100M)")
    if m[2] is None:
        return int(m[1])
    bits = Decimal(m[1]).scaleb(_SI[m[2].lower()])
    kbps = int((bits / 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    # A tiny non-zero limit must not round down to 0, which would mean "unlimited".
    return 1 if kbps == 0 and bits > 0 else kbps


_SIZE_RE = re.compile(r"([0-9]+)\s*(?:([km])(?:i?b)?|b)?", re.IGNORECASE)


def _block_size(name: str, text: str, base: Path) -> int:
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise _Bad(f"{name}: {_q(text)} is not a size (use bytes, or a K or M suffix, e.g. 4M)")
    n = int(m[1]) * {"k": 1024, "m": 1024 * 1024}.get((m[2] or "").lower(), 1)
    if not 64 * 1024 <= n <= 64 * 1024 * 1024:
        raise _Bad(f"{name}: {text} is out of range 64K-64M")
    if n % 4096:
        # Blocks map onto page-aligned reads/writes and journal entries.
        raise _Bad(f"{name}: {text} is not a multiple of 4096")
    return n


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host(name: str, text: str, base: Path) -> str:
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) <= 253 and all(_LABEL.fullmatch(x) for x in labels) and not labels[-1].isdigit():
        return host
    raise _Bad(f"{name}: {_q(text)} is not an IP address or hostname")


def _bind_host(name: str, text: str, base: Path) -> str:
    """An address to listen on: an IP literal or a host name that resolves now, on this
    host, to one of this host's addresses. ``serve`` binds the first address a name
    resolves to (``fallback.listener``), so that one is tried here (port 0): a name that
    does not resolve, or an address of another host, is refused now instead of at start."""
    host = _host(name, text, base)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise _Bad(f"{name}: {_q(text)} does not resolve ({why}): give an IP address of this "
                   "host, or a host name that resolves to one") from None
    for family, kind, proto, _, addr in infos[:1]:  # what the listener binds
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind((addr[0], 0, *addr[2:]))
        except OSError as exc:
            shown = "" if addr[0] == host else f" ({addr[0]})"
            raise _Bad(f"{name}: cannot listen on {_q(text)}{shown}: "
                       f"{exc.strerror or exc} (not an address of this host?)") from None
    return host


def bind_error(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """The error binding ``host:port`` gives now (``serve``'s bind would get the same), or
    None. Nothing listens: the socket is closed at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return OSError(0, str(getattr(exc, "strerror", None) or exc))
    for family, kind_, proto, _, addr in infos[:1]:
        try:
            with socket.socket(family, kind_, proto) as sock:
                if kind == socket.SOCK_STREAM:  # as asyncio's create_server does
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
        except OSError as exc:
            return exc
    return None


def _path(name: str, text: str, base: Path) -> Path:
    """Relative paths are relative to the config file, not to wherever the daemon was started."""
    return Path(os.path.normpath(base / text))


def _fs_path(kind: str) -> _Parse:
    """``kind`` is "dir" (must exist), "file" (must exist, readable) or "new-dir" (may not
    exist yet: the daemon creates it)."""

    def parse(name: str, text: str, base: Path) -> Path:
        path = _path(name, text, base)
        if not path.exists():
            if kind == "new-dir":
                return path
            raise _Bad(f"{name}: {path} does not exist")
        if kind == "file" and not path.is_file():
            raise _Bad(f"{name}: {path} is not a regular file")
        if kind == "file" and not os.access(path, os.R_OK):
            raise _Bad(f"{name}: {path} is not readable")
        if kind != "file" and not path.is_dir():
            raise _Bad(f"{name}: {path} is not a directory")
        return path

    return parse


_state_dir, _existing_dir, _readable_file = _fs_path("new-dir"), _fs_path("dir"), _fs_path("file")


def _suffix(name: str, text: str, base: Path) -> str:
    if "/" in text or "\\" in text:
        raise _Bad(f"{name}: {_q(text)} must not contain a path separator")
    return text


def _user_name(name: str, text: str, base: Path) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise _Bad(f"{name}: {_q(text)} is not a valid user name (1-64 of A-Z a-z 0-9 . _ -)")
    return text


def _password_hash(name: str, text: str, base: Path) -> str:
    if not text.startswith(_HASH_PREFIXES):
        # The value is deliberately not echoed: it may be a plaintext password pasted by mistake.
        raise _Bad(f'{name}: must start with "$argon2id$" or "$scrypt$"')
    try:  # the whole hash, bounds included: a placeholder or a typo is found now, not at login
        validate_hash(text)
    except ValueError as exc:
        raise _Bad(f"{name}: {exc}") from None
    return text


# What ``fallback hash-password`` makes: RFC 9106 section 4, second recommended option
# (Argon2id m=64 MiB, t=3, p=4). scrypt: N=2^17, r=8, as OWASP's Password Storage Cheat
# Sheet recommends at least.
MIN_ARGON2 = (65536, 3)
MIN_SCRYPT = (17, 8)
_PLACEHOLDER_WORD = re.compile(r"placeholder|replace|example|changeme", re.IGNORECASE)


def hash_warning(text: str | None) -> str | None:
    """Why a valid hash deserves a look: a placeholder nobody can log in with (the salt and
    hash are plain words, or say so), or a cost below what ``fallback hash-password`` makes
    (a stolen config file is then cheap to crack). None when neither."""
    if text is None:
        return None
    try:
        parsed = _parse_hash(text)
    except ValueError:
        return None
    fields = text.strip().split("$")
    words = all(part and part.isascii() and part.decode().isprintable()
                for part in (parsed.salt, parsed.digest))
    if words or any(_PLACEHOLDER_WORD.search(f) for f in fields[-2:]):
        return ("password_hash is a placeholder, not a hash of a password: nobody can log in "
                "with it; replace it with the output of `fallback hash-password`")
    if isinstance(parsed, _Argon2Hash):
        if parsed.memory_kib >= MIN_ARGON2[0] and parsed.iterations >= MIN_ARGON2[1]:
            return None
        return (f"weak password_hash: Argon2id m={parsed.memory_kib},t={parsed.iterations},"
                f"p={parsed.lanes} is below the recommended minimum m={MIN_ARGON2[0]} KiB, "
                f"t={MIN_ARGON2[1]} (RFC 9106's second option, m=65536,t=3,p=4, is what "
                "`fallback hash-password` makes): make a new one with it")
    if parsed.log2_n >= MIN_SCRYPT[0] and parsed.r >= MIN_SCRYPT[1]:
        return None
    return (f"weak password_hash: scrypt ln={parsed.log2_n},r={parsed.r},p={parsed.p} is below "
            f"the recommended minimum ln={MIN_SCRYPT[0]},r={MIN_SCRYPT[1]}: make an Argon2id "
            "hash with `fallback hash-password` (RFC 9106's second option, m=65536,t=3,p=4)")

"""Password hashing and HTTP Basic credential checking for the fallback daemon.

Passwords are stored in the configuration as self-describing PHC strings, so the
cost parameters travel with each hash and can be raised later without breaking
existing entries.  Argon2id is the default; ``$scrypt$`` strings (as written by
passlib and friends) are also accepted so operators can bring hashes from other
tools.

Argon2 runs through argon2-cffi (the reference C implementation, libargon2).  It
replaced cryptography's ``Argon2id`` because, with cryptography 50, two
derivations with ``lanes > 1`` on two threads at once never return: four
simultaneous wrong passwords froze the daemon for good.  argon2-cffi also
releases the GIL while hashing, so checks do not stall the event loop.

Running the checks (a thread pool of their own, a bounded backlog, a cache of
recent successes) is ``fallback.logincheck``.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import TextIO

from argon2 import PasswordHasher, profiles
from argon2.low_level import Type, hash_secret_raw

__all__ = [
    "ARGON2_ITERATIONS",
    "ARGON2_LANES",
    "ARGON2_MEMORY_KIB",
    "hash_password",
    "hash_password_main",
    "parse_basic",
    "validate_hash",
    "verify_password",
]

# Cost of new hashes: RFC 9106 section 4, second recommended option ("if much less
# memory is available"): Argon2id, m=64 MiB, t=3, p=4, 128-bit salt, 256-bit tag;
# argon2-cffi ships it as profiles.RFC_9106_LOW_MEMORY.  Well above OWASP's
# Password Storage Cheat Sheet minimum (m=19 MiB, t=2, p=1).  About 110 ms per
# hash on the 2-CPU build host (measured with argon2-cffi 25.1).
_PROFILE = profiles.RFC_9106_LOW_MEMORY
ARGON2_MEMORY_KIB = _PROFILE.memory_cost
ARGON2_ITERATIONS = _PROFILE.time_cost
ARGON2_LANES = _PROFILE.parallelism
_HASHER = PasswordHasher.from_parameters(_PROFILE)

# Upper bounds when *reading* hashes: the config is trusted, but a typo such as
# m=6553600 should fail validation instead of allocating gigabytes per request.
_MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB
_MAX_ARGON2_ITERATIONS = 64
_MAX_LANES = 64
_MAX_SCRYPT_LN = 24  # N = 16M; with r=8 that is 16 GiB, refused by hashlib anyway
_MAX_SCRYPT_MEMORY = 2 * 1024**3

_B64_RE = re.compile(r"[A-Za-z0-9+/.]+")
_INT_RE = re.compile(r"[0-9]{1,10}")


def _b64encode(data: bytes) -> str:
    """Standard base64 without padding, as the PHC string format prescribes."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    """Decode unpadded PHC base64; ``.`` is accepted for ``+`` (passlib's "ab64")."""
    if not text or not _B64_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError(f"invalid password hash: {what} is not valid unpadded base64")
    text = text.replace(".", "+")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid password hash: {what} is not valid base64") from exc


def _parse_params(text: str, expected: tuple[str, ...], scheme: str) -> dict[str, int]:
    """Parse ``k=v,k=v`` requiring exactly the expected keys, in order."""
    params: dict[str, int] = {}
    parts = text.split(",")
    keys = tuple(p.partition("=")[0] for p in parts)
    if keys != expected:
        raise ValueError(
            f"invalid {scheme} hash: parameters must be {','.join(k + '=..' for k in expected)}"
        )
    for part in parts:
        key, _, value = part.partition("=")
        if not _INT_RE.fullmatch(value):
            raise ValueError(f"invalid {scheme} hash: parameter {key} is not a decimal integer")
        params[key] = int(value)
    return params


@dataclass(frozen=True, slots=True)
class _Argon2Hash:
    memory_kib: int
    iterations: int
    lanes: int
    salt: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class _ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse_hash(encoded: str) -> _Argon2Hash | _ScryptHash:
    """Parse and bound-check a stored hash; never echoes the value in errors.

    The value is not quoted in messages because a common mistake is to paste a
    plaintext password into the config where a hash belongs.
    """
    if not isinstance(encoded, str):
        raise ValueError("invalid password hash: expected a string")
    fields = encoded.strip().split("$")
    if len(fields) < 2 or fields[0] != "":
        raise ValueError(
            "invalid password hash: expected a PHC string such as '$argon2id$v=19$...' "
            "(generate one with the hash-password command)"
        )
    scheme = fields[1]
    if scheme == "argon2id":
        if len(fields) != 6:
            raise ValueError(
                "invalid argon2id hash: expected '$argon2id$v=19$m=..,t=..,p=..$salt$hash'"
            )
        if fields[2] != "v=19":
            raise ValueError("invalid argon2id hash: only version v=19 (0x13) is supported")
        params = _parse_params(fields[3], ("m", "t", "p"), "argon2id")
        salt = _b64decode(fields[4], "salt")
        digest = _b64decode(fields[5], "hash")
        m, t, p = params["m"], params["t"], params["p"]
        if not 1 <= p <= _MAX_LANES:
            raise ValueError(f"invalid argon2id hash: p must be in 1..{_MAX_LANES}")
        if not 8 * p <= m <= _MAX_ARGON2_MEMORY_KIB:
            raise ValueError(
                f"invalid argon2id hash: m must be in {8 * p}..{_MAX_ARGON2_MEMORY_KIB} KiB"
            )
        if not 1 <= t <= _MAX_ARGON2_ITERATIONS:
            raise ValueError(f"invalid argon2id hash: t must be in 1..{_MAX_ARGON2_ITERATIONS}")
        if len(salt) < 8:
            raise ValueError("invalid argon2id hash: salt must be at least 8 bytes")
        if not 4 <= len(digest) <= 1024:
            raise ValueError("invalid argon2id hash: hash must be 4..1024 bytes")
        return _Argon2Hash(m, t, p, salt, digest)
    if scheme == "scrypt":
        if len(fields) != 5:
            raise ValueError("invalid scrypt hash: expected '$scrypt$ln=..,r=..,p=..$salt$hash'")
        params = _parse_params(fields[2], ("ln", "r", "p"), "scrypt")
        salt = _b64decode(fields[3], "salt")
        digest = _b64decode(fields[4], "hash")
        ln, r, p = params["ln"], params["r"], params["p"]
        if not 1 <= ln <= _MAX_SCRYPT_LN:
            raise ValueError(f"invalid scrypt hash: ln must be in 1..{_MAX_SCRYPT_LN}")
        if r < 1 or p < 1 or r * p >= 1 << 30:
            raise ValueError("invalid scrypt hash: r and p must be positive and r*p < 2^30")
        if 128 * r * (1 << ln) > _MAX_SCRYPT_MEMORY:
            raise ValueError("invalid scrypt hash: parameters need more than 2 GiB of memory")
        if not salt:
            raise ValueError("invalid scrypt hash: empty salt")
        if not 1 <= len(digest) <= 1024:
            raise ValueError("invalid scrypt hash: hash must be 1..1024 bytes")
        return _ScryptHash(ln, r, p, salt, digest)
    raise ValueError(
        "invalid password hash: unsupported scheme (expected '$argon2id$' or '$scrypt$')"
    )


def validate_hash(encoded: str) -> None:
    """Raise ``ValueError`` if *encoded* is not a usable hash (for config validation)."""
    _parse_hash(encoded)


def hash_password(password: str) -> str:
    """Hash *password* with Argon2id and return a PHC string
    (``$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>``).

    Cost: RFC 9106 section 4's second recommended option, m=65536 KiB, t=3, p=4,
    16-byte random salt, 32-byte output (see ``ARGON2_*``); about 110 ms on the
    build host.  The GIL is released while hashing, but every check still costs
    that much CPU, which is why :class:`CredentialCache` and
    :class:`PasswordChecker` exist.
    """
    return _HASHER.hash(password)


def verify_password(password: str, encoded: str) -> bool:
    """Return whether *password* matches *encoded* (argon2id or scrypt PHC string).

    Cost parameters come from the string itself, after :func:`_parse_hash` has
    bounded them.  A wrong password returns False; a malformed or unsupported
    string raises ``ValueError`` so that configuration mistakes surface at load
    time instead of looking like bad passwords.  Thread-safe: any number of
    checks may run at once (argon2-cffi, hashlib).
    """
    parsed = _parse_hash(encoded)
    secret = password.encode("utf-8")
    if isinstance(parsed, _Argon2Hash):
        # The raw primitive with the parsed fields rather than argon2-cffi's PHC
        # decoder, so passlib's "." base64 variant reads as before.
        candidate = hash_secret_raw(
            secret,
            parsed.salt,
            time_cost=parsed.iterations,
            memory_cost=parsed.memory_kib,
            parallelism=parsed.lanes,
            hash_len=len(parsed.digest),
            type=Type.ID,
            version=19,
        )
    else:
        n = 1 << parsed.log2_n
        candidate = hashlib.scrypt(
            secret,
            salt=parsed.salt,
            n=n,
            r=parsed.r,
            p=parsed.p,
            # hashlib's default limit (32 MiB) rejects common parameters such as
            # ln=17; allow what the parameters need plus slack for OpenSSL's overhead.
            maxmem=128 * parsed.r * (n + parsed.p + 2) + (1 << 20),
            dklen=len(parsed.digest),
        )
    return hmac.compare_digest(candidate, parsed.digest)


def parse_basic(header_value: str | None) -> tuple[str, str] | None:
    """Split an ``Authorization: Basic`` header into (user, password).

    Returns None when the header is absent, uses another scheme or is malformed,
    so callers can answer 401 uniformly.  Credentials are decoded as UTF-8 (what
    current browsers and curl send, RFC 7617 ``charset="UTF-8"``), falling back
    to Latin-1 for legacy clients.
    """
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    token = token.strip()
    if not token or not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", token):
        return None
    token = token.rstrip("=")
    if len(token) % 4 == 1:
        return None
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except binascii.Error:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password


def hash_password_main(stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """CLI entry: read a password and print its hash for pasting into the config.

    Reading from a pipe takes one line (only the line terminator is removed, so
    leading/trailing spaces stay part of the password).  On a terminal the
    password is read twice without echo, since a typo would otherwise lock the
    user out with no way to see what was typed.
    """
    if stdin.isatty():
        try:
            password = getpass.getpass("Password: ", stream=stderr)
            confirm = getpass.getpass("Confirm password: ", stream=stderr)
        except (EOFError, KeyboardInterrupt):
            print("\nerror: no password read", file=stderr)
            return 2
        if password != confirm:
            print("error: passwords do not match", file=stderr)
            return 2
    else:
        password = stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
            if password.endswith("\r"):
                password = password[:-1]
    if not password:
        print("error: empty password", file=stderr)
        return 2
    print(hash_password(password), file=stdout)
    return 0

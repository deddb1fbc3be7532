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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from argon2 import PasswordHasher, profiles
from argon2.low_level import Type, hash_secret_raw

__all__ = [
    "ARGON2_ITERATIONS",
    "ARGON2_LANES",
    "ARGON2_MEMORY_KIB",
    "ChecksBusy",
    "CredentialCache",
    "PasswordChecker",
    "SourceBusy",
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
_BUSY_LOG_INTERVAL = 10.0  # seconds between "checks saturated" log lines

log = logging.getLogger("fallback.daemon")
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


class CredentialCache:
    """Remember recent successful password checks.

    HTTP Basic resends the password on every request and each Argon2id check
    costs ~0.1 s of CPU and 64 MiB, so without a cache a plain client (curl,
    aria2c) would pay that on every request.  Entries are keyed by an HMAC (random per-process key) over
    user, password and stored hash, so the cache never holds plaintext, a memory
    dump does not give an offline-guessable fast hash, and changing the hash in
    the config invalidates old entries.  Failures are never cached, so a wrong
    guess always pays full price.  Not thread-safe: use from the event loop.
    """

    __slots__ = ("_clock", "_entries", "_key", "_maxsize", "_ttl")

    def __init__(
        self,
        ttl: float = 300.0,
        maxsize: int = 1024,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._ttl = ttl
        self._maxsize = maxsize
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, user: str, password: str, encoded: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user, password, encoded):
            data = part.encode("utf-8", "surrogatepass")
            # Length prefixes keep ("ab", "c") and ("a", "bc") distinct.
            mac.update(len(data).to_bytes(8, "big"))
            mac.update(data)
        return mac.digest()

    def lookup(self, user: str, password: str, encoded: str) -> bool:
        """Return whether this exact (user, password, hash) was verified recently.

        Cheap (one HMAC-SHA256); never runs the password hash.
        """
        key = self._digest(user, password, encoded)
        now = self._clock()
        self._prune(now)
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if now < expiry:
            self._entries.move_to_end(key)
            return True
        del self._entries[key]
        return False

    def remember(self, user: str, password: str, encoded: str) -> None:
        """Record a successful verification for ``ttl`` seconds, evicting the LRU entry."""
        key = self._digest(user, password, encoded)
        self._entries[key] = self._clock() + self._ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def check(self, user: str, password: str, encoded: str) -> bool:
        """Return whether *password* is valid for *user* given its stored hash.

        :meth:`lookup`, else :func:`verify_password` (in the calling thread) and
        :meth:`remember` on success.  Raises ``ValueError`` for a malformed
        *encoded*, like :func:`verify_password`.
        """
        if self.lookup(user, password, encoded):
            return True
        if not verify_password(password, encoded):
            return False
        self.remember(user, password, encoded)
        return True

    def _prune(self, now: float) -> None:
        """Drop expired entries from the LRU end, so stale ones don't linger.

        Opportunistic: it stops at the first live entry, which is enough because
        the size bound, not pruning, is what limits memory.
        """
        while self._entries:
            oldest_key, expiry = next(iter(self._entries.items()))
            if now < expiry:
                return
            del self._entries[oldest_key]

    def clear(self) -> None:
        """Forget all entries (e.g. after a config reload removes a user)."""
        self._entries.clear()


class ChecksBusy(Exception):
    """More password checks are pending than :class:`PasswordChecker` admits.

    The daemon answers 503 with ``Retry-After`` instead of queueing without bound.
    """


class SourceBusy(ChecksBusy):
    """One client address already has ``per_source`` checks pending: answered 429 at once."""


@dataclass(slots=True, eq=False)
class _Job:
    """One admitted check: waiting in a lane, then running on the pool."""

    password: str
    stored: str
    key: bytes  # CredentialCache digest: identical requests join this job
    source: str | None
    priority: bool
    result: asyncio.Future[bool]
    running: bool = False
    waiters: int = 0  # requests awaiting the result


class PasswordChecker:
    """Password checks on their own small thread pool, with a bounded two-lane backlog.

    Each uncached check costs one full hash (~110 ms and 64 MiB for the default
    Argon2id), so checks never run on the daemon's file I/O pool, where a flood
    of wrong passwords would delay every transfer.  At most *workers* run at
    once (memory: workers x the hash's m).  Admission, all decided at once
    without waiting:

    * a request whose credentials are in the :class:`CredentialCache` costs no
      check and is answered at once;
    * a request identical to a pending check (same user, password and hash:
      a client opening several connections at once) waits for that check's
      answer and takes no slot;
    * a client address (*source*) may have at most *per_source* checks pending;
      beyond that :class:`SourceBusy` (the daemon answers 429);
    * the general lane admits at most *max_pending* checks (running + queued);
      a *priority* check (a user coming back from an address it logged in from
      before, see :class:`fallback.throttle.LoginThrottle`) may also use
      *priority_pending* further slots reserved for such checks, so strangers
      cannot fill them; beyond: :class:`ChecksBusy` (503).

    A worker that frees up takes the oldest priority check first, then the
    oldest general one, so a known user waits for at most the checks already
    running (about one hash time), however full the general lane is.

    An unknown user is checked against a dummy hash made with
    :func:`hash_password` at construction, so it costs exactly what a known
    user with default-cost hash costs and names cannot be probed by timing.
    Successful checks are cached; failures never are.  Use :meth:`check` from
    one event loop.
    """

    def __init__(self, workers: int = 2, max_pending: int = 16,
                 cache: CredentialCache | None = None, *,
                 priority_pending: int = 8, per_source: int = 2) -> None:
        if workers < 1 or max_pending < workers or priority_pending < 0 or per_source < 1:
            raise ValueError("need workers >= 1, max_pending >= workers, priority_pending >= 0 "
                             "and per_source >= 1")
        self.cache = cache if cache is not None else CredentialCache()
        self.workers = workers
        self.max_pending = max_pending
        self.priority_pending = priority_pending
        self.per_source = per_source
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fb-auth")
        self._lanes: tuple[deque[_Job], deque[_Job]] = (deque(), deque())  # priority, general
        self._jobs: dict[bytes, _Job] = {}  # every admitted job, by credentials digest
        self._by_source: dict[str, int] = {}  # pending jobs per source (no zero entries)
        self._general = 0  # admitted through the general lane
        self._running = 0
        self._closed = False
        self._busy_logged = -_BUSY_LOG_INTERVAL
        self._dummy = hash_password(secrets.token_urlsafe(32))

    @property
    def pending(self) -> int:
        """Checks admitted and not finished (running or queued), both lanes."""
        return len(self._jobs)

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._closed

    def _admit(self, source: str | None, priority: bool) -> None:
        """Raise unless a new check from *source* fits; see the class docstring."""
        if self._closed:
            raise ChecksBusy("the daemon is shutting down")
        if source is not None and self._by_source.get(source, 0) >= self.per_source:
            raise SourceBusy("too many logins at once from this address, retry later")
        general_full = self._general >= self.max_pending
        if general_full and (not priority
                             or len(self._jobs) >= self.max_pending + self.priority_pending):
            now = time.monotonic()
            if now - self._busy_logged >= _BUSY_LOG_INTERVAL:
                self._busy_logged = now
                log.warning("password checks saturated (%d pending): refusing logins with 503",
                            len(self._jobs))
            raise ChecksBusy("too many logins at once, retry later")

    async def check(self, user: str, password: str, encoded: str | None, *,
                    source: str | None = None, priority: bool = False) -> bool:
        """Return whether *password* is right for *user* whose stored hash is *encoded*.

        ``encoded=None`` means no such user: the same work is done against the
        dummy hash and the answer is False.  *source* is the client's address
        key (None: no per-address cap); *priority* puts the check in the
        reserved lane.  Raises :class:`SourceBusy` or :class:`ChecksBusy` when
        not admitted (after :meth:`shutdown` too, and for checks still queued
        then), and ``ValueError`` for a malformed *encoded* (config validation
        rules that out).
        """
        stored = self._dummy if encoded is None else encoded
        if self.cache.lookup(user, password, stored):
            return encoded is not None
        key = self.cache._digest(user, password, stored)
        job = self._jobs.get(key)
        if job is None:
            self._admit(source, priority)
            job = _Job(password, stored, key, source, priority,
                       asyncio.get_running_loop().create_future())
            self._jobs[key] = job
            if source is not None:
                self._by_source[source] = self._by_source.get(source, 0) + 1
            if not priority or self._general < self.max_pending:
                job.priority = False  # a free general slot: no need to use the reserve
                self._general += 1
            self._lanes[0 if job.priority else 1].append(job)
            self._dispatch()
        job.waiters += 1
        try:
            ok = await asyncio.shield(job.result)
        except asyncio.CancelledError:
            # The request went away.  A queued job nobody else awaits is dropped (no hash
            # runs, so its slot is free at once); a running one keeps its slot until done.
            job.waiters -= 1
            lane = self._lanes[0 if job.priority else 1]
            if not job.waiters and not job.running and job in lane:
                lane.remove(job)
                self._release(job)
                job.result.cancel()
            raise
        if encoded is None or not ok:
            return False
        self.cache.remember(user, password, encoded)
        return True

    def _dispatch(self) -> None:
        """Start queued jobs, priority lane first, while a worker is free."""
        while self._running < self.workers and not self._closed:
            lane = self._lanes[0] or self._lanes[1]
            if not lane:
                return
            job = lane.popleft()
            job.running = True
            self._running += 1
            fut = self._pool.submit(verify_password, job.password, job.stored)

            def done(f: Future[bool], job: _Job = job) -> None:
                # In the pool's thread: finish on the event loop (gone if the daemon is).
                try:
                    job.result.get_loop().call_soon_threadsafe(self._finished, job, f)
                except RuntimeError:
                    pass

            fut.add_done_callback(done)

    def _finished(self, job: _Job, fut: Future[bool]) -> None:
        self._running -= 1
        self._release(job)
        if not job.result.done():
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled():
                job.result.set_exception(ChecksBusy("the daemon is shutting down"))
            elif exc is not None:
                job.result.set_exception(exc)
            else:
                job.result.set_result(fut.result())
        self._dispatch()

    def _release(self, job: _Job) -> None:
        """Free the slots of an admitted job (once it finished, or left the queue)."""
        del self._jobs[job.key]
        if not job.priority:
            self._general -= 1
        if job.source is not None:
            left = self._by_source[job.source] - 1
            if left:
                self._by_source[job.source] = left
            else:
                del self._by_source[job.source]

    def shutdown(self) -> None:
        """Stop: queued and later checks raise :class:`ChecksBusy` at once; running
        ones end on their own (one hash each, ~0.1 s)."""
        self._closed = True
        for lane in self._lanes:
            while lane:
                job = lane.popleft()
                self._release(job)
                if not job.result.done():
                    job.result.set_exception(ChecksBusy("the daemon is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)


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

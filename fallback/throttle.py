"""Login admission for the daemon: failed-login backoff, known (user, address) pairs.

Every wrong password costs the daemon one full password hash (~110 ms of CPU and
64 MiB), and every one is a guess.  This module decides, before any hash is
computed, whether a login attempt is admitted at all, and :func:`check_login`
ties it to :class:`fallback.logincheck.PasswordChecker`.  Two backoff rules:

* **per address** (``address_free`` = 10 failures): a client address that keeps
  failing, whatever user names it tries (password spraying), is refused for all
  of them.  IPv6 addresses count per /64, the block one subscriber usually gets.
  Attempts refused because the checks were busy (429: the address already has
  2 checks pending; 503: the backlog is full) count as failures of the address,
  so a client hammering a full backlog is throttled like one guessing.
* **per user name** (``user_free`` = 5 failures): a name that keeps failing,
  from however many addresses (distributed guessing), is refused from all of
  them *except its known addresses* (below).  Unknown names are tracked exactly
  like real ones, so the rule does not tell which names exist.

After the free failures of a rule, each further failure refuses attempts for
``base_delay`` x 2^(failures - free) seconds, capped at ``max_delay`` (2, 4, 8,
... 60 s by default).  Refused attempts are answered 429 with ``Retry-After``
without any password check and are not counted, so a client retrying too early
is not punished further.  A failure record is forgotten ``window`` seconds after
its last failure; a successful login forgets its user name's record (not the
address's: one account of one's own must not buy free guesses at the others).

**Known pairs**: a successful login records its (user name, address key) for
``known_ttl`` = 24 h (LRU, at most ``known_maxsize`` = 10000 pairs).  From a
known pair, the per-user rule does not apply (strangers guessing alice's
password cannot lock alice out of the address she works from) and the password
check goes into the checker's reserved priority lane (a flood from many
addresses cannot starve her).  The per-address rule still applies to known
pairs.  Knowing a pair never skips the password check, so it grants nothing
without the password.

The throttle is decided before the password is looked at, even for credentials
in the success cache: otherwise a refused stranger could test guesses against
the cache at HMAC speed (the right one answering 200, the others 429).

Consequences, by design: while an address is refused, other users behind it (a
shared NAT, the same box) are refused too; while a user name is refused, its
owner is refused from addresses it has not logged in from in the last 24 h,
until the delay passes (at most ``max_delay`` after the last failure).  A
brand-new client during a flood from many addresses cannot be told from the
flood: it gets 503 (Retry-After 1) while the general backlog is full, and if it
keeps retrying from one address, 429 with growing delays after 10 refusals.

Memory is bounded: each rule and the known pairs keep at most ``maxsize`` /
``known_maxsize`` records (LRU), and records expire.  Not thread-safe: use from
the event loop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fallback.logincheck import ChecksBusy, PasswordChecker, SourceBusy

__all__ = ["LoginRefused", "LoginThrottle", "check_login"]

log = logging.getLogger("fallback.daemon")

_MAX_NAME_KEY = 64  # longer names (never valid users) are keyed by digest, not stored


@dataclass(slots=True)
class _Record:
    failures: int
    last: float  # clock time of the latest failure
    until: float  # attempts are refused before this clock time


class _Rule:
    """Failure records for one kind of key, oldest latest-failure first."""

    __slots__ = ("entries", "free", "kind", "maxsize")

    def __init__(self, kind: str, free: int, maxsize: int) -> None:
        self.kind = kind
        self.free = free
        self.maxsize = maxsize
        self.entries: OrderedDict[str, _Record] = OrderedDict()

    def prune(self, now: float, window: float) -> None:
        # Entries are ordered by ``last`` (moved to the end on each failure), so the
        # expired ones are exactly a prefix.
        while self.entries:
            key, rec = next(iter(self.entries.items()))
            if now - rec.last < window:
                return
            del self.entries[key]

    def wait(self, key: str, now: float) -> float:
        rec = self.entries.get(key)
        return 0.0 if rec is None else max(0.0, rec.until - now)


class LoginThrottle:
    """Decide whether a login attempt may be checked, and learn from failures.

    Times are in seconds of *clock* (monotonic by default).  See the module
    docstring for the rules and their defaults.
    """

    def __init__(
        self,
        *,
        address_free: int = 10,
        user_free: int = 5,
        base_delay: float = 2.0,
        max_delay: float = 60.0,
        window: float = 300.0,
        maxsize: int = 10000,
        known_ttl: float = 86400.0,
        known_maxsize: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if address_free < 1 or user_free < 1 or maxsize < 1 or known_maxsize < 1:
            raise ValueError("address_free, user_free, maxsize and known_maxsize must be "
                             "at least 1")
        if known_ttl <= 0:
            raise ValueError("known_ttl must be positive")
        if not 0 < base_delay <= max_delay <= window:
            raise ValueError("need 0 < base_delay <= max_delay <= window")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self._clock = clock
        self._address = _Rule("address", address_free, maxsize)
        self._user = _Rule("user", user_free, maxsize)
        self.known_ttl = known_ttl
        self.known_maxsize = known_maxsize
        # (user key, address key) -> expiry clock time; ordered by expiry (same ttl for all).
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    @staticmethod
    def address_key(remote: str | None) -> str:
        """The throttling key of a peer address: IPv4 as is, IPv6 by its /64."""
        if not remote:
            return "-"
        try:
            ip = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return remote[:_MAX_NAME_KEY]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    @staticmethod
    def user_key(name: str) -> str:
        """The throttling key of a user name (a digest for absurdly long ones)."""
        if len(name) <= _MAX_NAME_KEY:
            return name
        data = name.encode("utf-8", "surrogatepass")
        return "#" + hashlib.blake2b(data, digest_size=16).hexdigest()

    def known(self, remote: str | None, user: str) -> bool:
        """Whether *user* logged in successfully from *remote*'s address key in the last
        ``known_ttl`` seconds (cheap: one dict lookup)."""
        now = self._clock()
        while self._known:
            pair, expiry = next(iter(self._known.items()))
            if now < expiry:
                break
            del self._known[pair]
        return (self.user_key(user), self.address_key(remote)) in self._known

    def retry_after(self, remote: str | None, user: str, *, known: bool = False) -> int:
        """Whole seconds to wait before an attempt may be checked; 0 if admitted now.

        *known* (see :meth:`known`) exempts the attempt from the per-user rule.
        Rounded up, as ``Retry-After`` takes integer seconds (RFC 9110 section 10.2.3).
        """
        now = self._clock()
        for rule in (self._address, self._user):
            rule.prune(now, self.window)
        wait = self._address.wait(self.address_key(remote), now)
        if not known:
            wait = max(wait, self._user.wait(self.user_key(user), now))
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, remote: str | None, user: str) -> None:
        """Count a wrong password from *remote* for *user*; may start a refusal period.

        Logs one line when an address or name starts being refused, not per request.
        """
        now = self._clock()
        self._count(self._address, self.address_key(remote), now)
        self._count(self._user, self.user_key(user), now)

    def refused(self, remote: str | None) -> None:
        """Count an attempt from *remote* refused because the checks were busy, as a
        failure of the address only (the name was never checked)."""
        self._count(self._address, self.address_key(remote), self._clock())

    def _count(self, rule: _Rule, key: str, now: float) -> None:
        rule.prune(now, self.window)
        rec = rule.entries.get(key)
        if rec is None:
            rec = rule.entries[key] = _Record(0, now, 0.0)
        rec.failures += 1
        rec.last = now
        rule.entries.move_to_end(key)
        while len(rule.entries) > rule.maxsize:
            rule.entries.popitem(last=False)
        if rec.failures < rule.free:
            return
        steps = min(rec.failures - rule.free, 32)
        delay = min(self.base_delay * 2**steps, self.max_delay)
        was_refusing = rec.until > now
        rec.until = max(rec.until, now + delay)
        if not was_refusing:
            log.warning("login throttled: %s %r refused for %d s after %d failed logins",
                        rule.kind, key, math.ceil(rec.until - now), rec.failures)

    def succeeded(self, remote: str | None, user: str) -> None:
        """Forget the failures of *user* (its address's failures stay counted) and
        remember (*user*, *remote*) as a known pair for ``known_ttl`` seconds."""
        key = self.user_key(user)
        self._user.entries.pop(key, None)
        pair = (key, self.address_key(remote))
        self._known[pair] = self._clock() + self.known_ttl
        self._known.move_to_end(pair)
        while len(self._known) > self.known_maxsize:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        """Failure records held (both rules; known pairs not included)."""
        return len(self._address.entries) + len(self._user.entries)

    @property
    def known_pairs(self) -> int:
        """Known (user, address) pairs held, at most ``known_maxsize``."""
        return len(self._known)


class LoginRefused(Exception):
    """A login attempt refused without a password check: answer *status* (429 or 503)
    with ``Retry-After: retry_after`` (seconds) and *message* (``str(exc)``)."""

    def __init__(self, status: int, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


async def check_login(checker: PasswordChecker, throttle: LoginThrottle, remote: str | None,
                      user: str, password: str, encoded: str | None) -> bool:
    """Decide one HTTP Basic login from *remote*: True if *password* is right for *user*
    (stored hash *encoded*, None for no such user), False if wrong (counted as a failure).

    Order: the throttle (per-user rule skipped for a known pair), then the checker
    (cache, per-address cap, priority lane for a known pair).  Raises
    :class:`LoginRefused`: 429 while throttled or when the address already has
    ``checker.per_source`` checks pending, 503 when the backlog is full or the
    daemon is stopping.  Busy refusals count as failures of the address.
    """
    known = throttle.known(remote, user)
    if wait := throttle.retry_after(remote, user, known=known):
        raise LoginRefused(429, f"too many failed logins, retry in {wait} s", wait)
    try:
        ok = await checker.check(user, password, encoded, source=throttle.address_key(remote),
                                 priority=known)
    except SourceBusy as exc:
        throttle.refused(remote)
        raise LoginRefused(429, str(exc), 1) from None
    except ChecksBusy as exc:
        if not checker.closed:
            throttle.refused(remote)
        raise LoginRefused(503, str(exc), 1) from None
    if not ok or encoded is None:
        throttle.failed(remote, user)
        return False
    throttle.succeeded(remote, user)
    return True

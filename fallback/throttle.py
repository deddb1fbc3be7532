"""Failed-login throttling for the daemon: exponential backoff per client address and user name.

Every wrong password costs the daemon one full password hash (~110 ms of CPU and
64 MiB), and every one is a guess.  This module decides, before any hash is
computed, whether a login attempt is admitted at all.  Two independent rules:

* **per address** (``address_free`` = 10 failures): a client address that keeps
  failing, whatever user names it tries (password spraying), is refused for all
  of them.  IPv6 addresses count per /64, the block one subscriber usually gets.
* **per user name** (``user_free`` = 5 failures): a name that keeps failing,
  from however many addresses (distributed guessing), is refused from all of
  them.  Unknown names are tracked exactly like real ones, so the rule does not
  tell which names exist.

After the free failures of a rule, each further failure refuses attempts for
``base_delay`` x 2^(failures - free) seconds, capped at ``max_delay`` (2, 4, 8,
... 60 s by default).  Refused attempts are answered 429 with ``Retry-After``
without any password check and are not counted, so a client retrying too early
is not punished further.  A failure record is forgotten ``window`` seconds after
its last failure; a successful login forgets its user name's record (not the
address's: one account of one's own must not buy free guesses at the others).

Consequences, by design: while an address is refused, other users behind it (a
shared NAT, the same box) are refused too; while a user name is refused, its
owner is refused from everywhere until the delay passes (at most ``max_delay``
after the last failure), which is the usual price of per-account throttling.

Memory is bounded: each rule keeps at most ``maxsize`` records (LRU), and
records expire.  Not thread-safe: use from the event loop.
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

__all__ = ["LoginThrottle"]

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if address_free < 1 or user_free < 1 or maxsize < 1:
            raise ValueError("address_free, user_free and maxsize must be at least 1")
        if not 0 < base_delay <= max_delay <= window:
            raise ValueError("need 0 < base_delay <= max_delay <= window")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self._clock = clock
        self._address = _Rule("address", address_free, maxsize)
        self._user = _Rule("user", user_free, maxsize)

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

    def retry_after(self, remote: str | None, user: str) -> int:
        """Whole seconds to wait before an attempt may be checked; 0 if admitted now.

        Rounded up, as ``Retry-After`` takes integer seconds (RFC 9110 section 10.2.3).
        """
        now = self._clock()
        for rule in (self._address, self._user):
            rule.prune(now, self.window)
        wait = max(self._address.wait(self.address_key(remote), now),
                   self._user.wait(self.user_key(user), now))
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, remote: str | None, user: str) -> None:
        """Count a wrong password from *remote* for *user*; may start a refusal period.

        Logs one line when an address or name starts being refused, not per request.
        """
        now = self._clock()
        for rule, key in ((self._address, self.address_key(remote)),
                          (self._user, self.user_key(user))):
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
                continue
            steps = min(rec.failures - rule.free, 32)
            delay = min(self.base_delay * 2**steps, self.max_delay)
            was_refusing = rec.until > now
            rec.until = max(rec.until, now + delay)
            if not was_refusing:
                log.warning("login throttled: %s %r refused for %d s after %d failed logins",
                            rule.kind, key, math.ceil(rec.until - now), rec.failures)

    def succeeded(self, user: str) -> None:
        """Forget the failures of *user* (its address's failures stay counted)."""
        self._user.entries.pop(self.user_key(user), None)

    def __len__(self) -> int:
        return len(self._address.entries) + len(self._user.entries)

"""Running the daemon's password checks: ``PasswordChecker`` (the checks on a small
thread pool of their own, behind a bounded two-lane backlog) and ``CredentialCache``
(recent successes, so HTTP Basic's password on every request costs one hash, not one
per request).

The hashes themselves (PHC strings, Argon2id and scrypt) are ``fallback.auth``; the
login throttle in front of the checker is ``fallback.throttle``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fallback.auth import hash_password, verify_password

__all__ = ["ChecksBusy", "CredentialCache", "PasswordChecker", "SourceBusy"]

log = logging.getLogger("fallback.daemon")

_BUSY_LOG_INTERVAL = 10.0  # seconds between "checks saturated" log lines


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

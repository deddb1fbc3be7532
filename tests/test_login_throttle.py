"""Logins under load and attack (issue #10, denial of service 1-2; issue #14).

Against real daemons over raw HTTP: concurrent cold password checks neither
deadlock nor stop SIGTERM from working; failed logins are throttled per client
address and per user name with 429 + ``Retry-After`` and no password hash; known
and unknown user names fail in the same time; a flood of wrong passwords does
not slow file transfers of a logged-in user; a flood from many addresses does not keep
out a user returning from a known address (priority lane), one address gets at most 2
checks, and the per-user rule spares the user's known addresses. Client sockets bind to distinct
loopback addresses (127.0.0.0/8) to stand for distinct clients.

Plus unit tests of :class:`fallback.throttle.LoginThrottle` with a fake clock and of
:class:`fallback.logincheck.PasswordChecker`'s lanes.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import re
import signal
import statistics
import time
from dataclasses import dataclass

import aiohttp
import pytest

from fallback.auth import hash_password
from fallback.logincheck import ChecksBusy, PasswordChecker
from fallback.throttle import LoginThrottle
from tests.conftest import PASSWORDS, Daemon, make_file, sha256

# -- raw HTTP helpers ---------------------------------------------------------------------------

_addresses = (f"127.0.{a}.{b}" for a in itertools.count(10) for b in range(1, 255))


def fresh_address() -> str:
    """A loopback address no other request of this test session has used."""
    return next(_addresses)


@dataclass
class Reply:
    status: int
    seconds: float
    retry_after: str | None
    body: bytes


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def request(d: Daemon, user: str, password: str, *, source: str = "127.0.0.1",
                  method: str = "GET", path: str = "/", data: bytes | None = None,
                  timeout: float = 20.0) -> Reply:
    """One request on a new connection from *source*; the time includes the connect."""
    conn = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        async with s.request(method, f"http://127.0.0.1:{d.http_port}{path}", data=data,
                             headers={"Authorization": basic(user, password)},
                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.read()
            return Reply(r.status, time.perf_counter() - t0, r.headers.get("Retry-After"), body)


async def statuses(coros: list) -> list[int]:  # type: ignore[type-arg]
    """Run requests at once; a request that hangs past its timeout counts as status 0."""
    replies = await asyncio.gather(*coros, return_exceptions=True)
    return [r.status if isinstance(r, Reply) else 0 for r in replies]


def stop_within(d: Daemon, seconds: float) -> None:
    assert d.proc is not None
    t0 = time.monotonic()
    rc = d.stop(signal.SIGTERM)
    took = time.monotonic() - t0
    assert rc == 0 and took < seconds, f"SIGTERM took {took:.1f} s, rc {rc}: {d.log()[-2000:]}"


# -- concurrent cold checks: no deadlock, SIGTERM still works ------------------------------------

@pytest.mark.parametrize("n", [2, 4])
async def test_concurrent_wrong_logins_then_right_then_sigterm(daemon_factory, n: int) -> None:
    """cryptography 50's Argon2id never returned for two concurrent lanes=4 derivations:
    the requests hung, every later login with them, and SIGTERM could not stop the daemon."""
    d = daemon_factory()
    users = ["alice", "bob"] * (n // 2)  # at most 2 failures per name: under the throttle
    t0 = time.monotonic()
    # One address per request: an address may have only 2 checks pending.
    got = await statuses([request(d, u, f"wrong{i}", source=fresh_address(), timeout=15)
                          for i, u in enumerate(users)])
    assert got == [401] * n, got
    assert time.monotonic() - t0 < 10
    assert await statuses([request(d, u, PASSWORDS[u], timeout=15)
                           for u in ("alice", "bob")]) == [200, 200]
    stop_within(d, 5)


async def test_two_cold_concurrent_right_logins(daemon_factory) -> None:
    d = daemon_factory()
    got = await statuses([request(d, u, PASSWORDS[u], timeout=15) for u in ("alice", "bob")])
    assert got == [200, 200]
    stop_within(d, 5)


async def test_sigterm_with_checks_in_flight(daemon_factory) -> None:
    """SIGTERM while a backlog of password checks runs: the daemon still exits promptly."""
    d = daemon_factory()
    flood = [asyncio.ensure_future(request(d, f"ghost{i}", "x", source=fresh_address()))
             for i in range(12)]
    await asyncio.sleep(0.2)
    stop_within(d, 6)
    got = await statuses(flood)
    # Checks still queued were answered 503 at once rather than run; none hung or failed.
    assert set(got) <= {401, 503} and 503 in got, got


async def test_backlog_beyond_the_bound_is_refused_at_once(daemon_factory) -> None:
    """30 wrong passwords at once (distinct addresses and names, so no throttling): the
    checker admits 16, the rest get 503 + Retry-After without waiting for a hash."""
    d = daemon_factory()
    replies = await asyncio.gather(*(request(d, f"ghost{i}", "x", source=fresh_address())
                                     for i in range(30)))
    checked = [r.seconds for r in replies if r.status == 401]
    busy = [r for r in replies if r.status == 503]
    assert len(checked) + len(busy) == 30, [r.status for r in replies]
    assert len(checked) >= 16 and busy, [r.status for r in replies]
    assert all(r.retry_after == "1" and b'"error"' in r.body for r in busy)
    assert max(r.seconds for r in busy) < statistics.median(checked) / 2
    assert (await request(d, "bob", PASSWORDS["bob"])).status == 200


# -- throttling ----------------------------------------------------------------------------------

def _refused(r: Reply, fastest_check: float) -> None:
    assert r.status == 429, r
    assert r.retry_after is not None and 1 <= int(r.retry_after) <= 60, r.retry_after
    assert b'"error"' in r.body
    # No password hash was run: far below the quickest real check.
    assert r.seconds < fastest_check / 3, (r.seconds, fastest_check)


async def test_per_user_throttle_then_delay_then_success(daemon_factory) -> None:
    d = daemon_factory()
    here, elsewhere = fresh_address(), fresh_address()
    fails = [await request(d, "alice", f"guess{i}", source=here) for i in range(5)]
    assert [r.status for r in fails] == [401] * 5  # LoginThrottle's user_free
    fastest = min(r.seconds for r in fails)
    assert fastest > 0.03, fastest  # each was a real Argon2id check
    refused = [await request(d, "alice", "guess5", source=here) for _ in range(3)]
    for r in refused:
        _refused(r, fastest)
    # The per-user rule holds from any address, even for the right password ...
    _refused(await request(d, "alice", PASSWORDS["alice"], source=elsewhere), fastest)
    # ... and only for that name: bob at the same address is under the address limit.
    assert (await request(d, "bob", PASSWORDS["bob"], source=here)).status == 200
    await asyncio.sleep(int(refused[-1].retry_after or 0) + 0.2)
    assert (await request(d, "alice", PASSWORDS["alice"], source=here)).status == 200
    # The success forgot alice's failures: two more wrong passwords (from an address alice
    # never logged in from, where the per-user rule applies) are checked again (401), where a
    # 6th counted failure would have had the 7th refused.
    stranger = fresh_address()
    again = [await request(d, "alice", f"later{i}", source=stranger) for i in range(2)]
    assert [r.status for r in again] == [401, 401]
    log = d.log()
    assert len(re.findall(r"login throttled: user 'alice'", log)) == 1, log  # not per request


async def test_per_address_throttle_refuses_every_name_from_that_address(daemon_factory) -> None:
    """Spraying names from one address: after 10 failures (LoginThrottle's address_free) that
    address is refused for every name, another user's right password included; other
    addresses are not."""
    d = daemon_factory()
    here = fresh_address()
    fails = [await request(d, f"ghost{i}", "pw", source=here) for i in range(10)]
    assert [r.status for r in fails] == [401] * 10
    fastest = min(r.seconds for r in fails)
    _refused(await request(d, "bob", PASSWORDS["bob"], source=here), fastest)
    _refused(await request(d, "ghost99", "pw", source=here), fastest)
    assert (await request(d, "bob", PASSWORDS["bob"], source=fresh_address())).status == 200
    log = d.log()
    assert len(re.findall(rf"login throttled: address '{re.escape(here)}'", log)) == 1, log


# -- floods from many addresses; known (user, address) pairs -----------------------------------

async def _rotate_hash(d: Daemon, user: str) -> None:
    """Give *user* a fresh hash of the same password and SIGHUP: the daemon's credential
    cache (keyed by the hash) no longer holds the password, as 5 minutes after a login."""
    assert d.proc is not None
    text = d.config_path.read_text()
    old = re.search(rf"<name>{user}</name><password_hash>([^<]+)<", text)
    assert old is not None
    fresh = await asyncio.to_thread(hash_password, PASSWORDS[user])
    reloads = d.log().count("reloaded ")
    d.config_path.write_text(text.replace(old.group(1), fresh))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log().count("reloaded ") == reloads:
        assert time.monotonic() < deadline, d.log()[-2000:]
        await asyncio.sleep(0.05)


class Flood:
    """*workers* clients sending wrong passwords for random names as fast as answered, each
    moving to a new address every 10 tries (so no address reaches the per-address rule)."""

    def __init__(self, d: Daemon, workers: int) -> None:
        self.d, self.seen, self.stop = d, [], asyncio.Event()  # type: ignore[var-annotated]
        self.tasks = [asyncio.ensure_future(self._worker(k)) for k in range(workers)]

    async def _worker(self, k: int) -> None:
        source = fresh_address()
        for i in itertools.count():
            if self.stop.is_set():
                return
            if i % 10 == 9:
                source = fresh_address()
            r = await request(self.d, f"ghost{k}-{i}", "x", source=source, timeout=60)
            self.seen.append(r.status)

    async def end(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def _clear_refusal(r: Reply) -> None:
    assert r.status in (429, 503), r
    assert r.retry_after is not None and 1 <= int(r.retry_after) <= 60, r
    assert b'"error"' in r.body, r


async def test_known_pair_gets_in_under_a_many_address_flood(daemon_factory) -> None:
    """Issue #10 retest: 40 clients with wrong passwords, each on a new address every 10
    tries, kept the 16-check backlog full, so bob's right (uncached) password got 503 on every
    try. Now bob, coming back from the address he logged in from, goes to the reserved
    priority lane and is served next: 200 on the first try, twice, within a few seconds.

    A brand-new user (alice, never logged in, a new address) cannot be told from the flood:
    while the general backlog is full she gets 503 with Retry-After (or 429 with Retry-After
    once 10 refusals from her address count), never a hang; when a slot frees or the flood
    ends she gets in."""
    d = daemon_factory()
    home = fresh_address()
    assert (await request(d, "bob", PASSWORDS["bob"], source=home)).status == 200
    flood = Flood(d, 20)
    newcomer: list[Reply] = []
    try:
        await asyncio.sleep(1.5)  # the general backlog is full
        newcomer_address = fresh_address()

        async def newcomer_retries() -> None:
            for _ in range(4):
                r = await request(d, "alice", PASSWORDS["alice"], source=newcomer_address)
                newcomer.append(r)
                if r.status == 200:
                    return
                await asyncio.sleep(int(r.retry_after or 1))

        alice = asyncio.ensure_future(newcomer_retries())
        for _ in range(2):
            await _rotate_hash(d, "bob")  # not cached: a real check, in the priority lane
            r = await request(d, "bob", PASSWORDS["bob"], source=home, timeout=30)
            assert r.status == 200 and r.seconds < 5, (r, flood.seen.count(503))
        await alice
    finally:
        await flood.end()
    assert flood.seen.count(503) > 20 and 401 in flood.seen, set(flood.seen)  # it was a flood
    assert 429 not in flood.seen  # 10 tries per address: the address rule never engaged
    for r in newcomer:
        if r.status != 200:
            _clear_refusal(r)
            assert r.seconds < 3, r  # refused at once, no check
    if newcomer[-1].status != 200:
        await asyncio.sleep(int(newcomer[-1].retry_after or 1))
        assert (await request(d, "alice", PASSWORDS["alice"], source=newcomer_address)).status \
            == 200


async def test_one_address_gets_two_checks_and_busy_refusals_count(daemon_factory) -> None:
    """Before, one address could hold the whole backlog, and its 503s were not counted, so
    it was never throttled. Now: at most 2 checks pending per address (the rest: 429 at
    once), and each refusal counts as a failure of that address, so 6 at once plus 4 more
    wrong tries reach the address rule's 10 and the address is refused (429, Retry-After 2)."""
    d = daemon_factory()
    here = fresh_address()
    burst = await asyncio.gather(*(request(d, f"ghost{i}", "x", source=here) for i in range(6)))
    assert sorted(r.status for r in burst) == [401, 401, 429, 429, 429, 429], burst
    fastest = min(r.seconds for r in burst if r.status == 401)
    for r in burst:
        if r.status == 429:
            _refused(r, fastest)
            assert r.retry_after == "1" and b"from this address" in r.body, r
    # Identical credentials on parallel connections (aria2c -x, curl -Z) share one check,
    # so a cold start of 4 connections is not refused by the 2-per-address cap.
    same = await asyncio.gather(*(request(d, "alice", PASSWORDS["alice"], source=here)
                                  for _ in range(4)))
    assert [r.status for r in same] == [200] * 4, same
    for i in range(4):  # failures 7 to 10 of this address (the 4 refusals were 3 to 6)
        assert (await request(d, f"ghost{i}", "y", source=here)).status == 401
    r = await request(d, "bob", PASSWORDS["bob"], source=here)
    _refused(r, fastest)
    assert r.retry_after == "2" and b"too many failed logins" in r.body, r
    assert re.search(rf"login throttled: address '{re.escape(here)}'", d.log())


async def test_per_user_throttle_spares_known_addresses_not_strangers(daemon_factory) -> None:
    """Issue #10 retest: 5 wrong tries for alice from another address got 429 for alice's
    own right, cached login from her usual address. Now the per-user rule skips a (user,
    address) pair that logged in in the last 24 h, cached or not; it still refuses alice's
    name from any other address, her right password included (answering that one 200 from
    the cache would tell a guesser which guess is right, at no cost)."""
    d = daemon_factory()
    home, stranger, elsewhere = fresh_address(), fresh_address(), fresh_address()
    assert (await request(d, "alice", PASSWORDS["alice"], source=home)).status == 200
    fails = [await request(d, "alice", f"guess{i}", source=stranger) for i in range(5)]
    assert [r.status for r in fails] == [401] * 5
    fastest = min(r.seconds for r in fails)
    _refused(await request(d, "alice", f"guess{5}", source=stranger), fastest)
    _refused(await request(d, "alice", PASSWORDS["alice"], source=elsewhere), fastest)
    # From home: the cached login, a wrong password (checked, 401: the per-user rule does not
    # apply), and a right one after the cache lost it.
    assert (await request(d, "alice", PASSWORDS["alice"], source=home)).status == 200
    assert (await request(d, "alice", "typo", source=home)).status == 401
    await _rotate_hash(d, "alice")
    assert (await request(d, "alice", PASSWORDS["alice"], source=home)).status == 200
    # The successes from home cleared alice's count: the stranger is checked again.
    assert (await request(d, "alice", "guess6", source=stranger)).status == 401


# -- timing: names cannot be probed --------------------------------------------------------------

async def test_unknown_and_known_users_fail_in_the_same_time(daemon_factory) -> None:
    """Before: a known user's wrong password took ~220 ms, an unknown user's ~64 ms (a cheaper
    dummy hash). Now the dummy is a default-cost Argon2id hash made at start."""
    d = daemon_factory()
    known, unknown = [], []
    await request(d, "ghost", "warm-up", source=fresh_address())
    for k in range(16):
        r = await request(d, ("alice", "bob")[k % 2], f"wrong{k}", source=fresh_address())
        assert r.status == 401
        known.append(r.seconds)
        r = await request(d, f"nobody{k}", f"wrong{k}", source=fresh_address())
        assert r.status == 401
        unknown.append(r.seconds)
        if k % 4 == 3:  # two failures each so far: a success resets a name's counter
            for u in ("alice", "bob"):
                assert (await request(d, u, PASSWORDS[u])).status == 200
    ratio = statistics.median(known) / statistics.median(unknown)
    assert 1 / 1.5 < ratio < 1.5, (ratio, known, unknown)


# -- a flood of wrong passwords does not slow transfers ------------------------------------------

SIZE = 48 << 20


async def _transfer(d: Daemon, src: bytes, name: str) -> float:
    """PUT then GET *src* as bob (cached credentials); returns the seconds both took."""
    t0 = time.perf_counter()
    put = await request(d, "bob", PASSWORDS["bob"], method="PUT", path=f"/{name}", data=src,
                        timeout=120)
    assert put.status == 201, put
    got = await request(d, "bob", PASSWORDS["bob"], path=f"/{name}", timeout=120)
    assert got.status == 200 and got.body == src
    return time.perf_counter() - t0


async def test_wrong_password_flood_does_not_slow_file_io(daemon_factory, tmp_path) -> None:
    """Password checks run on their own pool: with 8 wrong-password requests always in
    flight, a logged-in user's upload and download (file I/O on the daemon's I/O pool)
    take about as long as alone. Before, checks shared the I/O pool (and deadlocked it)."""
    d = daemon_factory()
    src = make_file(tmp_path / "src.bin", SIZE).read_bytes()
    assert (await request(d, "bob", PASSWORDS["bob"])).status == 200  # cached from now on
    alone = min([await _transfer(d, src, f"alone{i}.bin") for i in range(2)])
    done = asyncio.Event()
    seen: list[int] = []

    async def attacker(k: int) -> None:
        for i in itertools.count():
            if done.is_set():
                return
            r = await request(d, f"ghost{k}-{i}", "x", source=fresh_address(), timeout=60)
            seen.append(r.status)

    flood = [asyncio.ensure_future(attacker(k)) for k in range(8)]
    await asyncio.sleep(0.5)  # the backlog is full before the transfer starts
    try:
        under_flood = await _transfer(d, src, "flood.bin")
    finally:
        done.set()
        await asyncio.gather(*flood)
    assert sha256(d.docroots["bob"] / "flood.bin") == sha256(tmp_path / "src.bin")
    assert len(seen) >= 8 and set(seen) == {401}, seen  # the flood really ran, unthrottled
    # Generous: the hashes share 2 CPUs with the transfer; a transfer queued behind them on a
    # shared pool takes far longer (and forever with the old deadlock).
    assert under_flood < 5 * alone + 3.0, (under_flood, alone)


# -- LoginThrottle unit tests (fake clock) -------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_user_backoff_doubles_up_to_the_cap(clock: FakeClock) -> None:
    t = LoginThrottle(user_free=3, address_free=1000, base_delay=2, max_delay=60, clock=clock)
    waits = []
    for _ in range(10):
        assert t.retry_after("10.0.0.1", "alice") == 0
        t.failed("10.0.0.1", "alice")
        waits.append(t.retry_after("10.0.0.1", "alice"))
        clock.now += waits[-1]
    assert waits == [0, 0, 2, 4, 8, 16, 32, 60, 60, 60]
    assert t.retry_after("10.9.9.9", "alice") == 0  # the delay has just passed
    t.failed("10.9.9.9", "alice")
    assert t.retry_after("10.9.9.9", "alice") == 60  # from any address
    assert t.retry_after("10.9.9.9", "bob") == 0


def test_address_rule_covers_every_name(clock: FakeClock) -> None:
    t = LoginThrottle(address_free=4, user_free=100, clock=clock)
    for i in range(4):
        t.failed("10.0.0.1", f"name{i}")
    assert t.retry_after("10.0.0.1", "someone-else") == 2
    assert t.retry_after("10.0.0.2", "someone-else") == 0
    clock.now += 1.5
    assert t.retry_after("10.0.0.1", "x") == 1  # rounded up, never 0 while refusing


def test_success_resets_the_user_not_the_address(clock: FakeClock) -> None:
    t = LoginThrottle(address_free=3, user_free=3, clock=clock)
    for _ in range(2):
        t.failed("10.0.0.1", "alice")
    t.succeeded("10.0.0.9", "alice")
    t.failed("10.0.0.2", "alice")
    assert t.retry_after("10.0.0.2", "alice") == 0  # 1 failure since the success, not 3
    t.failed("10.0.0.1", "bob")  # the address's third failure: its count was not reset
    assert t.retry_after("10.0.0.1", "carol") == 2


def test_failures_expire_after_the_window(clock: FakeClock) -> None:
    t = LoginThrottle(user_free=3, address_free=3, window=300, clock=clock)
    for _ in range(3):
        t.failed("10.0.0.1", "alice")
    assert len(t) == 2
    clock.now += 299
    t.retry_after("10.0.0.1", "alice")
    assert len(t) == 2
    clock.now += 1
    assert t.retry_after("10.0.0.1", "alice") == 0
    assert len(t) == 0  # pruned: memory goes back to nothing
    t.failed("10.0.0.1", "alice")
    assert t.retry_after("10.0.0.1", "alice") == 0  # counting starts over


def test_tables_are_lru_bounded(clock: FakeClock) -> None:
    t = LoginThrottle(maxsize=50, clock=clock)
    for i in range(10_000):
        t.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"user{i}" + "x" * 10_000)
        clock.now += 0.001
    assert len(t) == 100
    assert all(len(k) <= 64 for k in t._user.entries)  # long names are kept as digests


def test_address_keys() -> None:
    key = LoginThrottle.address_key
    assert key("192.0.2.7") == "192.0.2.7"
    assert key("::ffff:192.0.2.7") == "192.0.2.7"
    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("fe80::1%eth0") == "fe80::/64"
    assert key(None) == "-"


def test_one_log_line_per_refusal_period(clock: FakeClock,
                                         caplog: pytest.LogCaptureFixture) -> None:
    t = LoginThrottle(user_free=2, address_free=1000, clock=clock)
    with caplog.at_level(logging.WARNING, logger="fallback.daemon"):
        for _ in range(5):  # concurrent checks that all finish while already refusing
            t.failed("10.0.0.1", "alice")
        assert len(caplog.records) == 1
        clock.now += t.retry_after("10.0.0.1", "alice")
        t.failed("10.0.0.1", "alice")  # a new period
        assert len(caplog.records) == 2
    assert "user 'alice' refused for 2 s after 2 failed logins" in caplog.records[0].getMessage()


def test_known_pair_skips_the_user_rule_only(clock: FakeClock) -> None:
    t = LoginThrottle(user_free=2, address_free=3, known_ttl=86400, clock=clock)
    t.succeeded("10.0.0.1", "alice")
    for _ in range(2):
        t.failed("10.6.6.6", "alice")
    assert t.known("10.0.0.1", "alice") and not t.known("10.6.6.6", "alice")
    assert not t.known("10.0.0.1", "bob")  # a pair, not an address
    assert t.retry_after("10.6.6.6", "alice", known=False) == 2
    assert t.retry_after("10.0.0.1", "alice", known=True) == 0
    t.refused("10.0.0.1")  # busy refusals count for the address ...
    t.refused("10.0.0.1")
    t.failed("10.0.0.1", "alice")
    assert t.retry_after("10.0.0.1", "alice", known=True) == 2  # ... whose rule still applies
    clock.now += 86399
    assert t.known("10.0.0.1", "alice")
    clock.now += 1
    assert not t.known("10.0.0.1", "alice") and t.known_pairs == 0  # expired and pruned


def test_known_pairs_are_lru_bounded_and_ipv6_per_64(clock: FakeClock) -> None:
    t = LoginThrottle(known_maxsize=100, clock=clock)
    for i in range(5000):
        t.succeeded(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"user{i}" + "x" * 1000)
    assert t.known_pairs == 100
    assert t.known("10.0.19.135", "user4999" + "x" * 1000)
    assert not t.known("10.0.0.0", "user0" + "x" * 1000)  # evicted
    t.succeeded("2001:db8:1:2::1", "bob")
    assert t.known("2001:db8:1:2:ffff::9", "bob") and not t.known("2001:db8:1:3::1", "bob")


async def test_checker_serves_the_priority_lane_first() -> None:
    """One worker, general lane of 3: with it full, a priority check is admitted (the
    reserve) and runs next, before the general checks queued ahead of it."""
    stored = hash_password("pw")
    checker = PasswordChecker(workers=1, max_pending=3, priority_pending=1, per_source=5)
    order: list[str] = []

    async def one(name: str, **kw: object) -> None:
        await checker.check(name, "wrong", stored, **kw)  # type: ignore[arg-type]
        order.append(name)

    try:
        general = [asyncio.ensure_future(one(f"g{i}", source="a")) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(ChecksBusy):
            await checker.check("g3", "wrong", stored, source="b")  # general lane full
        vip = asyncio.ensure_future(one("vip", source="c", priority=True))
        await asyncio.sleep(0)
        assert checker.pending == 4
        with pytest.raises(ChecksBusy):  # the reserve is full too
            await checker.check("vip2", "wrong", stored, priority=True)
        await asyncio.gather(*general, vip)
        assert order == ["g0", "vip", "g1", "g2"], order
        assert checker.pending == 0 and not checker._by_source  # nothing left behind
    finally:
        checker.shutdown()


async def test_checker_frees_a_queued_slot_when_its_request_goes_away() -> None:
    """A queued check whose request is cancelled leaves the queue at once (no hash runs);
    a running one keeps its slot until the hash ends; a joined one runs for the others."""
    stored = hash_password("pw")
    checker = PasswordChecker(workers=1, max_pending=3, per_source=3)
    try:
        running = asyncio.ensure_future(checker.check("a", "w1", stored, source="s"))
        queued = asyncio.ensure_future(checker.check("b", "w2", stored, source="s"))
        joined = [asyncio.ensure_future(checker.check("c", "w3", stored)) for _ in range(2)]
        await asyncio.sleep(0)
        assert checker.pending == 3
        queued.cancel()
        joined[0].cancel()
        running.cancel()
        await asyncio.sleep(0)
        assert checker.pending == 2  # "b" left; "a" runs on, "c" has a waiter still
        assert await joined[1] is False
        assert checker.pending == 0 and not checker._by_source
    finally:
        checker.shutdown()


@pytest.mark.parametrize("kwargs", [
    {"user_free": 0}, {"address_free": 0}, {"maxsize": 0}, {"base_delay": 0},
    {"base_delay": 10, "max_delay": 5}, {"max_delay": 600, "window": 300},
])
def test_bad_parameters(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        LoginThrottle(**kwargs)


def test_cli_exits_3_on_a_throttled_login_and_says_when_to_retry(daemon_factory,
                                                                   tmp_path) -> None:
    """Before: ``error: too many failed logins, retry later`` and exit 1; exit 3 is the
    daemon refusing the user name or password, which a throttled login is."""
    d = daemon_factory()
    src = make_file(tmp_path / "t.bin", 1000, seed=1)
    seen = []
    for _ in range(10):
        rc, res, err = d.transfer(str(src), d.url("/"), password="wrong-guess", check=False,
                                  timeout=60)
        seen.append((rc, res.get("error")))
        if "throttled" in (res.get("error") or ""):
            break
    assert all(rc == 3 for rc, _ in seen), seen
    assert seen[0][1] == "wrong user name or password", seen
    assert re.fullmatch(r"login throttled by the daemon: too many failed logins, "
                        r"retry in \d+ s", seen[-1][1] or ""), seen
    assert err.strip() == f"error: {seen[-1][1]}", err

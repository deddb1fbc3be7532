"""Plain GET/HEAD/PUT against RFC 9110: validators, conditional requests, byte ranges.

Each test is named after the section whose rule it checks. The first half tests
the pure functions of ``fallback.plainhttp`` on the RFC's own examples; the
second half sends exact requests (``http.client``, raw sockets, curl) to a real
daemon and checks status, headers and bytes.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from fallback.plainhttp import (
    MAX_RANGES,
    Conditions,
    EntityTag,
    Selection,
    Validators,
    check_preconditions,
    choose,
    format_http_date,
    parse_etag_list,
    parse_http_date,
    parse_range,
    select_ranges,
    strong_match,
    weak_match,
)
from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256

SIZE = 100_003
OLD = 1_000_000_000  # Sun, 09 Sep 2001 01:46:40 GMT
OLD_DATE = "Sun, 09 Sep 2001 01:46:40 GMT"
EPOCH_1994 = 784111777  # the RFC's example instant, Sun, 06 Nov 1994 08:49:37 GMT


# == pure functions ===============================================================================
def test_5_6_7_all_three_date_formats_parse_to_the_same_instant() -> None:
    for text in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                 "Sun Nov  6 08:49:37 1994"):
        assert parse_http_date(text) == EPOCH_1994, text
    assert format_http_date(EPOCH_1994) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(OLD) == OLD_DATE
    assert parse_http_date(format_http_date(0)) == 0


def test_5_6_7_dates_are_case_sensitive_and_exact() -> None:
    for text in ("sun, 06 Nov 1994 08:49:37 GMT", "Sun, 06 nov 1994 08:49:37 GMT",
                 "Sun, 06 Nov 1994 08:49:37 gmt", "Sun, 06 Nov 1994 08:49:37 UTC",
                 "Sun, 6 Nov 1994 08:49:37 GMT", "Sun,  06 Nov 1994 08:49:37 GMT",
                 "Sun, 06 Nov 94 08:49:37 GMT", "Sun, 06 Nov 1994 8:49:37 GMT",
                 "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
                 "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT",
                 "Sun, 06 Nov 1994 08:60:00 GMT", "Sun Nov 06 08:49:37 1994 GMT",
                 "Sun Nov 6 08:49:37 1994", "Sun, ٠٦ Nov 1994 08:49:37 GMT", "", "0",
                 "Sun, 06-Nov-94 08:49:37 GMT", "Sunday, 06 Nov 1994 08:49:37 GMT"):
        assert parse_http_date(text) is None, text
    # a leap second is a valid second (5.6.7: second = 2DIGIT, 60 allowed)
    assert parse_http_date("Sun, 06 Nov 1994 08:49:60 GMT") == EPOCH_1994 + 23


def test_5_6_7_two_digit_years_are_at_most_50_years_ahead() -> None:
    now = parse_http_date("Thu, 01 Jan 2026 00:00:00 GMT")
    assert now is not None
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", now) == EPOCH_1994
    y76 = parse_http_date("Friday, 01-Jan-76 00:00:00 GMT", now)
    y77 = parse_http_date("Friday, 01-Jan-77 00:00:00 GMT", now)
    assert y76 == parse_http_date("Thu, 01 Jan 2076 00:00:00 GMT")  # 50 years ahead: kept
    assert y77 == parse_http_date("Sat, 01 Jan 1977 00:00:00 GMT")  # 51 ahead: the past


def test_8_8_3_entity_tag_lists() -> None:
    e = EntityTag
    assert parse_etag_list('"xyzzy"') == (e('"xyzzy"'),)
    assert parse_etag_list('"xyzzy", "r2d2xxxx", "c3piozzzz"') == (
        e('"xyzzy"'), e('"r2d2xxxx"'), e('"c3piozzzz"'))
    assert parse_etag_list('W/"xyzzy" ,\t"a,b" , , ""') == (
        e('"xyzzy"', weak=True), e('"a,b"'), e('""'))  # a comma inside the quotes belongs to it
    assert parse_etag_list(" * ") == "*"
    assert parse_etag_list("") == ()
    for bad in ('w/"x"', "xyzzy", '"x', '"x" "y"', '"x";', '*, "x"', '"a b"', 'W/ "x"'):
        assert parse_etag_list(bad) is None, bad


def test_8_8_3_2_strong_and_weak_comparison_table() -> None:
    # the table of RFC 9110 section 8.8.3.2
    rows = [('W/"1"', 'W/"1"', False, True), ('W/"1"', 'W/"2"', False, False),
            ('W/"1"', '"1"', False, True), ('"1"', '"1"', True, True)]
    for a, b, strong, weak in rows:
        ta, tb = parse_etag_list(a), parse_etag_list(b)
        assert isinstance(ta, tuple) and isinstance(tb, tuple)
        assert strong_match(ta[0], tb[0]) is strong, (a, b)
        assert weak_match(ta[0], tb[0]) is weak, (a, b)


def _validators(last_modified: int = OLD, strong_date: bool = True) -> Validators:
    return Validators(EntityTag('"v1"'), last_modified, strong_date)


def _pre(method: str = "GET", v: Validators | None = None, **fields: str) -> int | None:
    failed = check_preconditions(method, Conditions(**fields), v)
    return None if failed is None else failed[0]


def test_13_2_2_precedence_of_preconditions() -> None:
    v = _validators()
    later, earlier = format_http_date(OLD + 1), format_http_date(OLD - 1)
    # 1. If-Match first: false is 412 even when If-None-Match would say 304
    assert _pre(v=v, if_match='"v0"', if_none_match='"v1"') == 412
    # 2. If-Unmodified-Since only without If-Match
    assert _pre(v=v, if_unmodified_since=earlier) == 412
    assert _pre(v=v, if_match='"v1"', if_unmodified_since=earlier) is None
    # 3. If-None-Match: 304 for GET/HEAD, 412 for other methods
    assert _pre(v=v, if_match='"v1"', if_none_match='"v1"') == 304
    assert _pre("HEAD", v, if_none_match="*") == 304
    assert _pre("PUT", v, if_none_match="*") == 412
    # 4. If-Modified-Since only for GET/HEAD and only without If-None-Match
    assert _pre(v=v, if_modified_since=later) == 304
    assert _pre(v=v, if_none_match='"v0"', if_modified_since=later) is None
    assert _pre("PUT", v, if_modified_since=later) is None
    # no current representation: If-Match fails, If-None-Match: * holds (create-only PUT)
    assert _pre("PUT", None, if_match="*") == 412
    assert _pre("PUT", None, if_none_match="*") is None
    assert _pre("PUT", None, if_unmodified_since=earlier) is None


def test_13_1_5_if_range_decides_whether_range_applies() -> None:
    v = _validators()
    ranged = {"range": "bytes=0-0"}
    assert choose("GET", Conditions(if_range='"v1"', **ranged), v, 10) == Selection(206, ((0, 1),))
    for stale in ('"v0"', 'W/"v1"', format_http_date(OLD - 1), "garbage", '"v1", "v2"'):
        assert choose("GET", Conditions(if_range=stale, **ranged), v, 10) == Selection(200), stale
    assert choose("GET", Conditions(if_range=OLD_DATE, **ranged), v, 10).status == 206
    weak_date = _validators(strong_date=False)
    assert choose("GET", Conditions(if_range=OLD_DATE, **ranged), weak_date, 10).status == 200
    # HEAD: GET is the only method with range handling (14.2)
    assert choose("HEAD", Conditions(**ranged), v, 10) == Selection(200)


def test_14_1_1_range_grammar() -> None:
    assert parse_range("bytes=0-499") == ((0, 499),)
    assert parse_range("BYTES=500-") == ((500, None),)  # range units are case-insensitive
    assert parse_range("bytes=-500") == ((None, 500),)
    assert parse_range("bytes=0-0, -1") == ((0, 0), (None, 1))
    assert parse_range("bytes=500-600,601-999") == ((500, 600), (601, 999))
    assert parse_range("bytes=0-1 ,\t, 5-6,") == ((0, 1), (5, 6))  # OWS, empty elements
    assert parse_range("bytes=000-0002") == ((0, 2),)
    assert parse_range("bytes=" + "9" * 5000 + "-") == ((10**18, None),)  # no int() blow-up
    for invalid in ("bytes=5-3", "bytes=", "bytes=,", "bytes = 0-1", "bytes =0-1", "bytes=0 -1",
                    "bytes=0- 1", "bytes=--1", "bytes=1-2-3", "bytes=a-b", "bytes=0-1;x",
                    "bytes 0-1", "bytes", "=0-1", "bytes=0-1, bytes=2-3", "bytes=+1-2",
                    "bytes=٠-1", "items=0-1", "none=0-1"):
        assert parse_range(invalid) is None, invalid
    many = "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES))
    assert parse_range(many) is not None
    assert parse_range(many + f",{MAX_RANGES}-{MAX_RANGES}") is None


def test_14_1_2_byte_range_resolution() -> None:
    L = 10_000
    def sel(spec: str, length: int = L) -> Selection:
        specs = parse_range(spec)
        assert specs is not None, spec
        return select_ranges(specs, length)
    # the examples of 14.1.2
    assert sel("bytes=0-499") == Selection(206, ((0, 500),))
    assert sel("bytes=500-999") == Selection(206, ((500, 1000),))
    assert sel("bytes=-500") == sel("bytes=9500-") == Selection(206, ((9500, 10_000),))
    assert sel("bytes=0-0,-1") == Selection(206, ((0, 1), (9999, 10_000)))
    assert sel("bytes=500-600,601-999") == sel("bytes=500-700,601-999") == sel("bytes=500-999")
    # last-pos past the end is clipped; a suffix longer than the file is all of it
    assert sel("bytes=9000-20000") == Selection(206, ((9000, 10_000),))
    assert sel("bytes=-20000") == Selection(206, ((0, 10_000),))
    # unsatisfiable: first-pos at or past the end, a zero suffix
    assert sel("bytes=10000-") == sel("bytes=-0") == sel("bytes=10000-,-0") == Selection(416)
    assert sel("bytes=10000-,0-0") == Selection(206, ((0, 1),))  # one satisfiable is enough
    # zero length: only a non-zero suffix is satisfiable, and it selects nothing: 200
    assert sel("bytes=0-0", 0) == sel("bytes=0-", 0) == sel("bytes=-0", 0) == Selection(416)
    assert sel("bytes=-1", 0) == Selection(200)


def test_14_2_overlapping_ranges_are_coalesced_and_order_kept_otherwise() -> None:
    L = 10_000
    specs = parse_range("bytes=" + ",".join(["0-"] * MAX_RANGES))
    assert specs is not None and select_ranges(specs, L) == Selection(206, ((0, L),))
    specs = parse_range("bytes=5000-5999,0-99,9000-")  # disjoint, far apart: request order
    assert specs is not None
    assert select_ranges(specs, L) == Selection(206, ((5000, 6000), (0, 100), (9000, L)))
    specs = parse_range("bytes=5000-5999,0-99,100-199,9000-")  # adjacent ones merge: sorted
    assert specs is not None
    assert select_ranges(specs, L) == Selection(206, ((0, 200), (5000, 6000), (9000, L)))
    # however they overlap, no span repeats a byte: the body is never larger than the file
    specs = parse_range("bytes=" + ",".join(f"{i * 7}-{i * 7 + 500}" for i in range(MAX_RANGES)))
    assert specs is not None
    spans = select_ranges(specs, L).spans
    assert sum(b - a for a, b in spans) <= L


def test_8_8_strong_etag_from_inode_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    os.utime(f, ns=(OLD * 10**9 + 5, OLD * 10**9 + 5))
    st = os.stat(f)
    v = Validators.of(st, time.time())
    assert v.etag == EntityTag(f'"{st.st_ino:x}-3-{OLD * 10**9 + 5:x}"')
    assert not v.etag.weak
    assert v.last_modified == OLD
    assert not v.date_is_strong  # utime moved the date after the change (ctime is now)
    # a future mtime is replaced by the time of the response (8.8.2.1)
    os.utime(f, (time.time() + 86400, time.time() + 86400))
    now = time.time()
    assert Validators.of(os.stat(f), now).last_modified == int(now)


# == against a daemon =============================================================================
@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def h(self, name: str) -> str | None:
        return self.headers.get(name)


def _auth(user: str = "alice") -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()


def request(d: Daemon, method: str, path: str, headers: list[tuple[str, str]] | None = None,
            body: bytes | None = None, scheme: str = "http") -> Answer:
    """One request with exactly these header lines (plus Host and Authorization)."""
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=str(d.base / "state" / "cert.pem"))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", d.https_port, context=ctx, timeout=30)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Authorization", _auth())
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Answer(r.status, r.msg, r.read())
    finally:
        conn.close()


def get(d: Daemon, path: str, *headers: tuple[str, str], method: str = "GET") -> Answer:
    return request(d, method, path, list(headers))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    b = tmp_path_factory.mktemp("rfc9110")
    d = Daemon(b, free_port(), free_port(), {"alice": b / "docroot" / "alice"})
    d.start()
    root = d.docroots["alice"]
    make_file(root / "f.bin", SIZE, seed=21)
    make_file(root / "old.bin", 5000, seed=22)
    os.utime(root / "old.bin", (OLD, OLD))
    (root / "empty.bin").write_bytes(b"")
    yield d
    assert d.stop() == 0


def data(d: Daemon, name: str = "f.bin") -> bytes:
    return (d.docroots["alice"] / name).read_bytes()


def etag(d: Daemon, name: str = "f.bin") -> str:
    e = get(d, f"/{name}", method="HEAD").h("ETag")
    assert e is not None
    return e


def replace(d: Daemon, name: str, content: bytes, mtime_ns: int | None = None) -> None:
    """Publish new content the way uploads do: a new file renamed over the old one."""
    target = d.docroots["alice"] / name
    tmp = target.with_name(name + ".tmp")
    tmp.write_bytes(content)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, target)


def test_13_1_5_if_range_with_a_stale_etag_sends_the_whole_current_file(srv: Daemon) -> None:
    """A browser resuming a changed file must get all of the new one (200), not
    the tail of the new one to stitch onto the head of the old one."""
    name = "resume.bin"
    replace(srv, name, b"A" * 50_000)
    first = get(srv, f"/{name}", ("Range", "bytes=0-19999"))
    assert first.status == 206 and first.body == b"A" * 20_000
    old_tag = first.h("ETag")
    assert old_tag is not None and old_tag.startswith('"')
    # same size and even the same mtime: only the content (and the inode) changed
    st = os.stat(srv.docroots["alice"] / name)
    replace(srv, name, b"B" * 50_000, mtime_ns=st.st_mtime_ns)
    resumed = get(srv, f"/{name}", ("Range", "bytes=20000-"), ("If-Range", old_tag))
    assert resumed.status == 200
    assert resumed.body == b"B" * 50_000
    assert resumed.h("Content-Range") is None
    assert resumed.h("ETag") != old_tag
    # with the current tag the range applies
    ok = get(srv, f"/{name}", ("Range", "bytes=20000-"), ("If-Range", resumed.h("ETag") or ""))
    assert (ok.status, ok.h("Content-Range"), ok.body) == (
        206, "bytes 20000-49999/50000", b"B" * 30_000)


def test_13_1_5_if_range_etag_is_compared_strongly_and_without_range_ignored(srv: Daemon) -> None:
    tag = etag(srv)
    weak = get(srv, "/f.bin", ("Range", "bytes=0-9"), ("If-Range", "W/" + tag))
    assert (weak.status, weak.body) == (200, data(srv))
    no_range = get(srv, "/f.bin", ("If-Range", '"something-else"'))
    assert (no_range.status, len(no_range.body)) == (200, SIZE)
    invalid = get(srv, "/f.bin", ("Range", "bytes=0-9"), ("If-Range", "not a validator"))
    assert (invalid.status, invalid.body) == (200, data(srv))


def test_13_1_5_if_range_date_only_when_the_date_is_strong(srv: Daemon) -> None:
    root = srv.docroots["alice"]
    # old.bin's date was set after the fact (utime): ctime is later, so the date is weak
    r = get(srv, "/old.bin", ("Range", "bytes=0-9"), ("If-Range", OLD_DATE))
    assert (r.status, r.body) == (200, data(srv, "old.bin"))
    # a file untouched since it was written, and at least a second old: strong
    (root / "dated.bin").write_bytes(b"0123456789" * 10)
    mtime = os.stat(root / "dated.bin").st_mtime_ns // 10**9
    while time.time() < mtime + 1.05:
        time.sleep(0.05)
    lm = get(srv, "/dated.bin", method="HEAD").h("Last-Modified")
    assert lm == format_http_date(mtime)
    r = get(srv, "/dated.bin", ("Range", "bytes=10-19"), ("If-Range", lm))
    assert (r.status, r.body, r.h("Content-Range")) == (206, b"0123456789", "bytes 10-19/100")
    # an exact match is required, not "earlier or equal" as for If-Unmodified-Since
    r = get(srv, "/dated.bin", ("Range", "bytes=10-19"), ("If-Range", format_http_date(mtime + 1)))
    assert r.status == 200 and len(r.body) == 100


def test_13_1_1_if_match(srv: Daemon) -> None:
    tag = etag(srv)
    for ok in (tag, "*", f'"x", {tag}', f'"a,b" ,{tag}'):
        r = get(srv, "/f.bin", ("If-Match", ok))
        assert (r.status, len(r.body)) == (200, SIZE), ok
    for bad in ('"x"', "W/" + tag, "", "garbage", tag[:-1]):
        r = get(srv, "/f.bin", ("If-Match", bad))
        assert r.status == 412, bad
        assert r.h("Content-Type") == "application/json; charset=utf-8"
        assert r.body == b'{"error": "/f.bin: precondition failed (If-Match)"}'
    # two field lines are one list
    r = request(srv, "GET", "/f.bin", [("If-Match", '"x"'), ("If-Match", tag)])
    assert r.status == 200


def test_13_1_2_if_none_match_is_304_with_validators_and_no_body(srv: Daemon) -> None:
    full = get(srv, "/f.bin")
    tag = full.h("ETag") or ""
    for match in (tag, "W/" + tag, "*", f'"x", {tag}'):  # weak comparison
        for method in ("GET", "HEAD"):
            r = get(srv, "/f.bin", ("If-None-Match", match), method=method)
            assert (r.status, r.body) == (304, b""), (match, method)
            assert r.h("ETag") == tag and r.h("Last-Modified") == full.h("Last-Modified")
            assert r.h("Content-Length") is None and r.h("Content-Range") is None
    r = get(srv, "/f.bin", ("If-None-Match", '"x"'))
    assert (r.status, r.body) == (200, data(srv))


def test_13_1_3_if_modified_since(srv: Daemon) -> None:
    def status(*headers: tuple[str, str]) -> int:
        return get(srv, "/old.bin", *headers).status
    assert status(("If-Modified-Since", OLD_DATE)) == 304  # equal: not modified
    assert status(("If-Modified-Since", format_http_date(OLD + 3600))) == 304
    assert status(("If-Modified-Since", format_http_date(OLD - 1))) == 200
    assert status(("If-Modified-Since", "Sunday, 09-Sep-01 01:46:40 GMT")) == 304  # rfc850
    assert status(("If-Modified-Since", "Sun Sep  9 01:46:40 2001")) == 304  # asctime
    # ignored: invalid, more than one member, together with If-None-Match
    assert status(("If-Modified-Since", OLD_DATE.lower())) == 200
    assert status(("If-Modified-Since", "yesterday")) == 200
    r = request(srv, "GET", "/old.bin", [("If-Modified-Since", OLD_DATE)] * 2)
    assert r.status == 200
    assert status(("If-Modified-Since", OLD_DATE), ("If-None-Match", '"x"')) == 200
    r = get(srv, "/old.bin", ("If-Modified-Since", OLD_DATE))
    assert r.h("Last-Modified") == OLD_DATE and r.body == b""


def test_13_1_4_if_unmodified_since(srv: Daemon) -> None:
    r = get(srv, "/old.bin", ("If-Unmodified-Since", format_http_date(OLD - 1)))
    assert r.status == 412
    assert r.body == b'{"error": "/old.bin: precondition failed (If-Unmodified-Since)"}'
    assert get(srv, "/old.bin", ("If-Unmodified-Since", OLD_DATE)).status == 200
    assert get(srv, "/old.bin", ("If-Unmodified-Since", "garbage")).status == 200
    tag = etag(srv, "old.bin")
    r = get(srv, "/old.bin", ("If-Match", tag), ("If-Unmodified-Since", format_http_date(OLD - 1)))
    assert r.status == 200  # ignored when If-Match is present


def test_13_2_2_order_of_evaluation_on_the_wire(srv: Daemon) -> None:
    tag = etag(srv)
    assert get(srv, "/f.bin", ("If-Match", '"x"'), ("If-None-Match", tag)).status == 412
    assert get(srv, "/f.bin", ("If-Match", tag), ("If-None-Match", tag)).status == 304
    r = get(srv, "/f.bin", ("If-None-Match", tag), ("Range", "bytes=0-9"))
    assert (r.status, r.body) == (304, b"")  # before any range
    r = get(srv, "/f.bin", ("If-Match", tag), ("Range", "bytes=-10"), ("If-Range", '"old"'))
    assert (r.status, r.body) == (200, data(srv))
    r = get(srv, "/f.bin", ("If-Match", tag), ("Range", "bytes=-10"), ("If-Range", tag))
    assert (r.status, r.body) == (206, data(srv)[-10:])


def test_13_2_1_preconditions_do_not_turn_a_404_into_412(srv: Daemon) -> None:
    r = get(srv, "/missing.bin", ("If-Match", "*"))
    assert (r.status, r.body) == (404, b'{"error": "/missing.bin: no such file"}')


def test_14_2_ranges_applied_exactly(srv: Daemon) -> None:
    full = data(srv)
    cases = {"bytes=0-0": (0, 1), "bytes=100-199": (100, 200), "bytes=-1": (SIZE - 1, SIZE),
             f"bytes={SIZE - 5}-{SIZE * 10}": (SIZE - 5, SIZE), "bytes=-999999": (0, SIZE),
             "bytes=0-": (0, SIZE), "Bytes=7-8": (7, 9), "bytes=10-19, 15-29": (10, 30),
             "bytes=0-" + "9" * 400: (0, SIZE)}
    for spec, (a, b) in cases.items():
        r = get(srv, "/f.bin", ("Range", spec))
        assert r.status == 206, spec
        assert r.h("Content-Range") == f"bytes {a}-{b - 1}/{SIZE}", spec
        assert r.h("Content-Length") == str(b - a) and r.body == full[a:b], spec
        assert r.h("Accept-Ranges") == "bytes" and r.h("ETag") == etag(srv)
        assert r.h("Content-Type") == "application/octet-stream"


def test_14_2_invalid_or_foreign_range_is_ignored(srv: Daemon) -> None:
    for spec in ("bytes=5-3", "bytes=", "bytes = 0-1", "bytes=0 - 1", "items=0-1", "bytes 0-9",
                 "bytes=abc", "bytes=1-2-3", "bytes=" + ",".join(["0-0"] * (MAX_RANGES + 1))):
        r = get(srv, "/f.bin", ("Range", spec))
        assert (r.status, r.h("Content-Range"), len(r.body)) == (200, None, SIZE), spec
    r = request(srv, "GET", "/f.bin", [("Range", "bytes=0-1"), ("Range", "bytes=2-3")])
    assert (r.status, len(r.body)) == (200, SIZE)


def test_14_2_head_ignores_range_and_answers_as_get(srv: Daemon) -> None:
    r = get(srv, "/f.bin", ("Range", "bytes=0-9"), method="HEAD")
    assert (r.status, r.h("Content-Length"), r.h("Content-Range"), r.body) == (
        200, str(SIZE), None, b"")
    assert r.h("Accept-Ranges") == "bytes"


def test_15_5_17_unsatisfiable_range_is_416_with_the_length(srv: Daemon) -> None:
    mark = len(srv.log())
    for spec in (f"bytes={SIZE}-", "bytes=-0", f"bytes={SIZE}-{SIZE + 5},-0",
                 "bytes=" + "9" * 5000 + "-"):
        r = get(srv, "/f.bin", ("Range", spec))
        assert r.status == 416, spec
        assert r.h("Content-Range") == f"bytes */{SIZE}"
        assert json.loads(r.body) == {
            "error": f"/f.bin: range not satisfiable, the file has {SIZE} bytes"}
    assert srv.log()[mark:].count("range not satisfiable") == 4


def test_15_3_7_several_ranges_are_multipart_byteranges(srv: Daemon) -> None:
    full = data(srv)
    r = get(srv, "/f.bin", ("Range", "bytes=500-999, 0-9 ,-10"))
    assert r.status == 206 and r.h("Content-Range") is None
    ctype = r.h("Content-Type") or ""
    assert ctype.startswith("multipart/byteranges; boundary=")
    boundary = ctype.split("boundary=", 1)[1].encode()
    assert r.h("Content-Length") == str(len(r.body))
    parts = r.body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    got = []
    for part in parts[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "" and lines[1] == "Content-Type: application/octet-stream"
        assert lines[2].startswith("Content-Range: bytes ")
        rng = lines[2].removeprefix("Content-Range: bytes ").split("/")
        assert rng[1] == str(SIZE)
        a, b = map(int, rng[0].split("-"))
        assert content.endswith(b"\r\n")
        assert content[:-2] == full[a:b + 1]
        got.append((a, b))
    assert got == [(500, 999), (0, 9), (SIZE - 10, SIZE - 1)]  # the request's order


def test_14_2_overlapping_ranges_cannot_amplify(srv: Daemon) -> None:
    r = get(srv, "/f.bin", ("Range", "bytes=" + ",".join(["0-"] * MAX_RANGES)))
    assert (r.status, r.h("Content-Range")) == (206, f"bytes 0-{SIZE - 1}/{SIZE}")
    assert r.body == data(srv)
    spec = "bytes=" + ",".join(f"{i * 100}-{i * 100 + 5000}" for i in range(MAX_RANGES))
    r = get(srv, "/f.bin", ("Range", spec))
    assert r.status == 206 and len(r.body) <= SIZE
    assert r.h("Content-Range") == f"bytes 0-{(MAX_RANGES - 1) * 100 + 5000}/{SIZE}"


def test_14_1_2_zero_length_file(srv: Daemon) -> None:
    r = get(srv, "/empty.bin")
    assert (r.status, r.h("Content-Length"), r.body) == (200, "0", b"")
    for spec in ("bytes=0-0", "bytes=0-", "bytes=-0"):
        r = get(srv, "/empty.bin", ("Range", spec))
        assert (r.status, r.h("Content-Range")) == (416, "bytes */0"), spec
    r = get(srv, "/empty.bin", ("Range", "bytes=-5"))
    assert (r.status, r.h("Content-Length"), r.h("Content-Range"), r.body) == (200, "0", None, b"")


def test_9_3_2_head_sends_the_headers_of_get(srv: Daemon) -> None:
    tag = etag(srv)
    for headers in ([], [("If-None-Match", tag)], [("If-Match", '"x"')],
                    [("If-Modified-Since", format_http_date(OLD))]):
        g, h = request(srv, "GET", "/f.bin", headers), request(srv, "HEAD", "/f.bin", headers)
        assert g.status == h.status
        assert h.body == b""
        drop = {"date"}
        assert sorted((k.lower(), v) for k, v in g.headers.items() if k.lower() not in drop) == \
            sorted((k.lower(), v) for k, v in h.headers.items() if k.lower() not in drop), headers


def test_8_8_2_1_last_modified_never_in_the_future(srv: Daemon) -> None:
    f = srv.docroots["alice"] / "future.bin"
    f.write_bytes(b"x")
    future = time.time() + 10 * 86400
    os.utime(f, (future, future))
    r = get(srv, "/future.bin")
    lm, date = parse_http_date(r.h("Last-Modified") or ""), parse_http_date(r.h("Date") or "")
    assert lm is not None and date is not None and lm <= date + 1 and lm < future - 86400


def test_8_8_3_etag_changes_whenever_the_file_does(srv: Daemon) -> None:
    f = srv.docroots["alice"] / "tagged.bin"
    f.write_bytes(b"one")
    tags = [etag(srv, "tagged.bin")]
    with open(f, "r+b") as fh:  # same size, in place
        fh.write(b"two")
    os.utime(f, ns=(time.time_ns() + 10**6, time.time_ns() + 10**6))
    tags.append(etag(srv, "tagged.bin"))
    st = os.stat(f)
    replace(srv, "tagged.bin", b"333", mtime_ns=st.st_mtime_ns)  # same size, same mtime, new inode
    tags.append(etag(srv, "tagged.bin"))
    assert len(set(tags)) == 3, tags
    assert all(t.startswith('"') and t.endswith('"') for t in tags)  # strong


def test_8_4_a_compressed_sibling_is_never_served_instead(srv: Daemon) -> None:
    """The file asked for is sent as it is: no ``.gz`` sibling swapped in by
    Accept-Encoding, no Content-Encoding that makes a client unpack a ``.tar.gz``."""
    root = srv.docroots["alice"]
    make_file(root / "pair.bin", 3000, seed=23)
    make_file(root / "pair.bin.gz", 100, seed=24)
    r = get(srv, "/pair.bin", ("Accept-Encoding", "gzip, br"))
    assert (r.status, r.h("Content-Encoding"), r.body) == (200, None, data(srv, "pair.bin"))
    make_file(root / "a.tar.gz", 100, seed=25)
    r = get(srv, "/a.tar.gz", ("Accept-Encoding", "gzip"))
    assert (r.h("Content-Type"), r.h("Content-Encoding")) == ("application/gzip", None)
    assert r.body == data(srv, "a.tar.gz")


def test_14_2_https_ranges_and_multipart(srv: Daemon) -> None:
    full = data(srv)
    r = request(srv, "GET", "/f.bin", [("Range", "bytes=-300000")], scheme="https")
    assert (r.status, r.body) == (206, full)
    r = request(srv, "GET", "/f.bin", [("Range", "bytes=1-2,9000-9000")], scheme="https")
    assert r.status == 206 and r.h("Content-Length") == str(len(r.body))
    assert (r.h("Content-Type") or "").startswith("multipart/byteranges; boundary=")
    assert f"\r\nContent-Range: bytes 1-2/{SIZE}\r\n\r\n".encode() + full[1:3] in r.body
    assert f"\r\nContent-Range: bytes 9000-9000/{SIZE}\r\n\r\n".encode() + full[9000:9001] in r.body
    # near ranges are one part: fewer bytes than two part headers (14.2 coalescing)
    r = request(srv, "GET", "/f.bin", [("Range", "bytes=1-2,9-9")], scheme="https")
    assert (r.status, r.h("Content-Range"), r.body) == (206, f"bytes 1-9/{SIZE}", full[1:10])


def test_8_6_a_file_that_shrinks_mid_body_ends_the_connection(srv: Daemon) -> None:
    """Content-Length was promised: a short body must end the connection, not
    leave the client waiting (or reading the next answer as this one's bytes)."""
    f = srv.docroots["alice"] / "shrinks.bin"
    make_file(f, 48 << 20, seed=26)
    mark = len(srv.log())
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        s.settimeout(20)
        s.connect(("127.0.0.1", srv.http_port))
        s.sendall(f"GET /shrinks.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth()}\r\n\r\n"
                  .encode())
        got = s.recv(65536)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {48 << 20}".encode() in head
        os.truncate(f, 1 << 20)
        n = len(body)
        while chunk := s.recv(1 << 20):  # must end (EOF), not time out
            n += len(chunk)
    assert n < 48 << 20
    assert "the file shrank while being sent" in srv.log()[mark:]
    assert get(srv, "/f.bin").body == data(srv)  # still serving


# -- PUT -----------------------------------------------------------------------------------------
def put(d: Daemon, path: str, body: bytes, *headers: tuple[str, str]) -> Answer:
    return request(d, "PUT", path, list(headers), body)


def test_13_1_2_put_if_none_match_star_creates_only(srv: Daemon) -> None:
    root = srv.docroots["alice"]
    r = put(srv, "/new/created.bin", b"first", ("If-None-Match", "*"))
    assert (r.status, (root / "new" / "created.bin").read_bytes()) == (201, b"first")
    mark = len(srv.log())
    r = put(srv, "/new/created.bin", b"second", ("If-None-Match", "*"))
    assert r.status == 412
    assert r.body == b'{"error": "/new/created.bin: precondition failed (If-None-Match)"}'
    assert (root / "new" / "created.bin").read_bytes() == b"first"
    assert sorted(p.name for p in (root / "new").iterdir()) == ["created.bin"]
    assert srv.log()[mark:].count("precondition failed") == 1
    # a tag that does not match lets it through (weak comparison otherwise)
    tag = etag(srv, "new/created.bin")
    assert put(srv, "/new/created.bin", b"third", ("If-None-Match", "W/" + tag)).status == 412
    assert put(srv, "/new/created.bin", b"third", ("If-None-Match", '"x"')).status == 204
    assert (root / "new" / "created.bin").read_bytes() == b"third"


def test_13_1_1_put_if_match_prevents_lost_updates(srv: Daemon) -> None:
    root = srv.docroots["alice"]
    put(srv, "/doc.txt", b"v1")
    tag = etag(srv, "doc.txt")
    assert put(srv, "/doc.txt", b"v2", ("If-Match", tag)).status == 204
    assert (root / "doc.txt").read_bytes() == b"v2"
    for stale in (tag, "W/" + etag(srv, "doc.txt"), '"x"'):  # old tag, weak tag, other
        r = put(srv, "/doc.txt", b"v3", ("If-Match", stale))
        assert r.status == 412, stale
        assert r.body == b'{"error": "/doc.txt: precondition failed (If-Match)"}'
    assert (root / "doc.txt").read_bytes() == b"v2"
    assert put(srv, "/doc.txt", b"v3", ("If-Match", "*")).status == 204
    # If-Match: * needs a current representation: nothing is created
    assert put(srv, "/nodir/none.txt", b"x", ("If-Match", "*")).status == 412
    assert not (root / "nodir").exists()


def test_13_1_4_put_if_unmodified_since(srv: Daemon) -> None:
    root = srv.docroots["alice"]
    put(srv, "/ius.txt", b"v1")
    os.utime(root / "ius.txt", (OLD, OLD))
    earlier = format_http_date(OLD - 1)
    assert put(srv, "/ius.txt", b"v2", ("If-Unmodified-Since", earlier)).status == 412
    assert (root / "ius.txt").read_bytes() == b"v1"
    assert put(srv, "/ius.txt", b"v2", ("If-Unmodified-Since", OLD_DATE)).status == 204
    assert (root / "ius.txt").read_bytes() == b"v2"


def test_13_2_1_put_errors_come_before_preconditions(srv: Daemon) -> None:
    (srv.docroots["alice"] / "afolder").mkdir(exist_ok=True)
    r = put(srv, "/afolder", b"x", ("If-None-Match", "*"))
    assert (r.status, r.body) == (409, b'{"error": "/afolder: is a folder"}')
    r = put(srv, "/f.bin/x", b"x", ("If-Match", "*"))
    assert (r.status, r.body) == (409, b'{"error": "/f.bin: a file, not a folder (cannot write /f.bin/x)"}')


# -- real clients --------------------------------------------------------------------------------
def test_curl_continue_at_resumes_to_the_same_bytes(srv: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "part.bin"
    url = f"http://127.0.0.1:{srv.http_port}/f.bin"
    user = f"alice:{PASSWORDS['alice']}"
    p = subprocess.run(["curl", "-sS", "-u", user, "-r", "0-40000", "-o", str(out), url],
                       capture_output=True, timeout=60)
    assert p.returncode == 0 and out.stat().st_size == 40_001, p.stderr
    p = subprocess.run(["curl", "-sS", "-u", user, "-C", "-", "-o", str(out),
                        "-w", "%{http_code} %{size_download}", url],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"206 {SIZE - 40_001}".encode()
    assert sha256(out) == sha256(srv.docroots["alice"] / "f.bin")


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed")
def test_aria2c_continue_resumes_to_the_same_bytes(srv: Daemon, tmp_path: Path) -> None:
    src = srv.docroots["alice"] / "big8.bin"
    make_file(src, 8 << 20, seed=27)
    out = tmp_path / "big8.bin"
    whole = src.read_bytes()
    marker = bytes([whole[0] ^ 0xFF])  # shows that the existing bytes are kept, not fetched again
    out.write_bytes(marker + whole[1: 3 << 20])  # an interrupted download
    p = subprocess.run(
        ["aria2c", "-c", "-x4", "-s4", "--min-split-size=1M", "--http-user=alice",
         f"--http-passwd={PASSWORDS['alice']}", "--summary-interval=0",
         "--console-log-level=warn", "--file-allocation=none", "--auto-file-renaming=false",
         "-d", str(tmp_path), "-o", "big8.bin", f"http://127.0.0.1:{srv.http_port}/big8.bin"],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    got = out.read_bytes()
    assert got[:1] == marker and got[1:] == whole[1:]

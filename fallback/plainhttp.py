"""Plain-HTTP file responses: validators, conditional requests and byte ranges (RFC 9110).

Browsers, curl, wget and aria2c fetch docroot files with plain ``GET``/``HEAD``.
This module answers them exactly as RFC 9110 says, in two layers:

* pure functions over header text (no I/O, unit-tested on their own):
  :func:`parse_http_date` / :func:`format_http_date` (§5.6.7),
  :func:`parse_entity_tag` / :func:`parse_etag_list` and the comparison
  functions (§8.8.3), :func:`check_preconditions` (§13.1.1-§13.1.4 in the
  order of §13.2.2), :func:`if_range_holds` (§13.1.5), :func:`parse_range`
  and :func:`select_ranges` (§14.1-§14.2);
* :func:`serve_file`, the aiohttp handler body that opens the file once,
  derives the validators from that open file, evaluates the request and
  streams the answer (200, 206 single part or ``multipart/byteranges``,
  304, 412, 416) in bounded chunks.

Validators (§8.8):

* **ETag** is strong: ``"<st_ino>-<st_size>-<st_mtime_ns>"`` (lower-case hex).
  Replacing a file by rename (as this daemon, rsync and most tools publish
  files) gives it another inode; writing it in place changes ``st_mtime_ns``.
  The tag is only as strong as the file system's timestamps: two in-place
  rewrites of the same size within one timestamp tick, or a writer that sets
  the old ``st_mtime_ns`` back onto a recycled inode, go unnoticed.
* **Last-Modified** is ``st_mtime`` in whole seconds, but never later than
  now (§8.8.2.1). As a validator in ``If-Range`` a date is weak unless the
  server can deduce it is strong (§8.8.2.2): we deem it strong only when the
  inode's last change (``st_ctime``) lies in that same second (nothing
  touched or replaced the file since) and that second is over. Together with
  the client-side rule of §8.8.2.2 (a client only uses a date whose response
  ``Date`` was at least one second later) this rules out two versions within
  the second. In doubt the ``If-Range`` condition is false and the client gets
  the whole current file (200), never a mix of two versions.

Ranges (§14): only ``bytes`` (case-insensitive) on ``GET``; ``HEAD`` ignores
``Range`` (§14.2: GET is the only method with range handling) and answers the
headers of the 200. An invalid ``Range`` (bad grammar, ``last < first``) or one
of another unit is ignored (200), as §14.2 allows; a valid but unsatisfiable
set gets 416 with ``Content-Range: bytes */LEN``. At most :data:`MAX_RANGES`
specs are honoured (more: 200); overlapping ranges, or ranges closer than
:data:`MERGE_GAP`, are coalesced (§14.2, §15.3.7), so a response never carries
more file bytes than the file has, however the ranges overlap (§17.15).
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import logging
import mimetypes
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from aiohttp import web
from multidict import MultiMapping

from fallback.errors import PreconditionFailed
from transport.errors import ErrorKind, PathError, ProtocolError

log = logging.getLogger("fallback.daemon")

MAX_RANGES = 32  # range specs honoured in one Range field; more are ignored (§14.2, §17.15)
MERGE_GAP = 128  # ranges closer than one multipart part header are coalesced (§14.2)
CHUNK = 256 * 1024  # bytes read and written per step (memory per response)
GET_HEAD = frozenset({"GET", "HEAD"})

# -- §5.6.7 dates ---------------------------------------------------------------------------------
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_D, _M = "|".join(_DAYS), "|".join(_MONTHS)
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF = re.compile(rf"(?:{_D}), ([0-9]{{2}}) ({_M}) ([0-9]{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"(?:{'|'.join(_LONG_DAYS)}), ([0-9]{{2}})-({_M})-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"(?:{_D}) ({_M}) ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")


def format_http_date(seconds: int) -> str:
    """``seconds`` since the epoch as an IMF-fixdate, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``
    (RFC 9110 §5.6.7; English names whatever the locale)."""
    t = time.gmtime(seconds)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def parse_http_date(text: str, now: float | None = None) -> int | None:
    """An HTTP-date in any of its three formats -> seconds since the epoch, else None.

    RFC 9110 §5.6.7: a recipient MUST accept IMF-fixdate, the obsolete
    rfc850-date and asctime-date; HTTP-date is case-sensitive. A two-digit
    rfc850 year that would be more than 50 years after ``now`` (default: the
    clock) means the most recent past year with those digits. Impossible
    dates (31 Feb, 24:00:00) are not dates. Second 60 (a leap second) is
    accepted and counts as the next second.
    """
    if m := _IMF.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(text):
        day, mon, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        # the latest year ending in yy that is at most 50 years ahead
        year = str(int(yy) + 100 * ((this_year + 50 - int(yy)) // 100))
    elif m := _ASCTIME.fullmatch(text):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    y, mo, d = int(year), _MONTHS.index(mon) + 1, int(day.strip())
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 60:
        return None
    try:
        datetime.date(y, mo, d)
    except ValueError:
        return None
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))


# -- §8.8.3 entity tags ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EntityTag:
    """``opaque`` includes its double quotes, as on the wire (RFC 9110 §8.8.3)."""

    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return ("W/" if self.weak else "") + self.opaque


def _etagc_ok(opaque: str) -> bool:
    # etagc = %x21 / %x23-7E / obs-text (§8.8.3); the quotes are checked by the caller
    return all(c == "\x21" or "\x23" <= c <= "\x7e" or "\x80" <= c <= "\xff" for c in opaque[1:-1])


def parse_entity_tag(text: str) -> EntityTag | None:
    """One ``entity-tag`` (``"x"`` or ``W/"x"``, ``W/`` case-sensitive), else None."""
    weak = text.startswith("W/")
    opaque = text[2:] if weak else text
    if len(opaque) < 2 or opaque[0] != '"' or opaque[-1] != '"' or not _etagc_ok(opaque):
        return None
    return EntityTag(opaque, weak)


def parse_etag_list(text: str) -> Literal["*"] | tuple[EntityTag, ...] | None:
    """``"*" / #entity-tag`` (If-Match, If-None-Match) -> ``"*"``, the tags, or None if malformed.

    List rules of §5.6.1: OWS around commas, empty elements ignored; a comma
    inside the quotes belongs to the tag. Work is linear in ``len(text)``.
    """
    if text.strip(" \t") == "*":
        return "*"
    tags: list[EntityTag] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t,":
            i += 1
        if i == n:
            return tuple(tags)
        start = i
        if text.startswith("W/", i):
            i += 2
        if i == n or text[i] != '"':
            return None
        end = text.find('"', i + 1)
        if end < 0:
            return None
        tag = parse_entity_tag(text[start:end + 1])
        if tag is None:
            return None
        tags.append(tag)
        i = end + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] != ",":
            return None


def strong_match(a: EntityTag, b: EntityTag) -> bool:
    """Strong comparison (§8.8.3.2): both not weak and the opaque-tags identical."""
    return not a.weak and not b.weak and a.opaque == b.opaque


def weak_match(a: EntityTag, b: EntityTag) -> bool:
    """Weak comparison (§8.8.3.2): the opaque-tags identical, either or both may be weak."""
    return a.opaque == b.opaque


# -- validators of a file -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Validators:
    """What a file's current representation is compared against.

    ``last_modified`` is whole seconds since the epoch (None if it cannot be
    written as an HTTP-date); ``date_is_strong`` says whether an exact match of
    it may stand for an exact match of the bytes (§8.8.2.2, see module doc).
    """

    etag: EntityTag
    last_modified: int | None
    date_is_strong: bool

    @classmethod
    def of(cls, st: os.stat_result, now: float) -> Validators:
        """The validators of the file whose ``fstat`` is ``st``, at time ``now`` (seconds)."""
        etag = EntityTag(f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"')
        mtime = st.st_mtime_ns // 1_000_000_000
        lm: int | None = min(mtime, int(now))  # never in the future (§8.8.2.1)
        try:
            format_http_date(min(mtime, int(now)))
        except (OverflowError, OSError, ValueError):  # before what gmtime can express
            lm = None
        strong = lm == mtime and st.st_ctime_ns // 1_000_000_000 == mtime and now >= mtime + 1
        return cls(etag, lm, strong)

    def headers(self) -> dict[str, str]:
        """``ETag`` and ``Last-Modified`` as sent with 200, 206 and 304."""
        out = {"ETag": str(self.etag)}
        if self.last_modified is not None:
            out["Last-Modified"] = format_http_date(self.last_modified)
        return out


# -- §13 preconditions ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Conditions:
    """The raw precondition and range fields of a request (None: absent).

    Several field lines of one name are combined with ``", "`` (§5.3), which
    makes a repeated singleton field (a date, ``If-Range``, ``Range``) invalid,
    as §13.1.3 and §13.1.4 require.
    """

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    if_range: str | None = None
    range: str | None = None

    @classmethod
    def from_headers(cls, headers: MultiMapping[str]) -> Conditions:
        def field(name: str) -> str | None:
            lines = headers.getall(name, [])
            return ", ".join(v.strip(" \t") for v in lines) if lines else None
        return cls(field("If-Match"), field("If-None-Match"), field("If-Modified-Since"),
                   field("If-Unmodified-Since"), field("If-Range"), field("Range"))


def _any_match(text: str, etag: EntityTag, *, strong: bool) -> bool:
    tags = parse_etag_list(text)
    if tags == "*":
        return True
    match = strong_match if strong else weak_match
    return any(match(t, etag) for t in tags or ())


def check_preconditions(method: str, c: Conditions, v: Validators | None) -> tuple[int, str] | None:
    """Steps 1-4 of RFC 9110 §13.2.2 -> ``(304 or 412, failing field)``, or None to go on.

    ``v`` is None when the target has no current representation (a PUT that
    would create it). The caller must have answered first whatever the
    request would get without its preconditions if that is not 2xx (§13.2.1).

    * If-Match (§13.1.1): ``*`` holds if the file exists; else strong
      comparison with any listed tag (a malformed list matches nothing).
    * If-Unmodified-Since (§13.1.4), only without If-Match: fails if the
      file's date is later; ignored if not a valid date or there is no file.
    * If-None-Match (§13.1.2): weak comparison; ``*`` fails if the file
      exists; failing is 304 for GET/HEAD, 412 for other methods.
    * If-Modified-Since (§13.1.3), only GET/HEAD without If-None-Match:
      fails (304) if the file's date is not later than the given one.
    """
    if c.if_match is not None:
        if v is None or not _any_match(c.if_match, v.etag, strong=True):
            return 412, "If-Match"
    elif c.if_unmodified_since is not None and v is not None and v.last_modified is not None:
        date = parse_http_date(c.if_unmodified_since)
        if date is not None and v.last_modified > date:
            return 412, "If-Unmodified-Since"
    if c.if_none_match is not None:
        if v is not None and _any_match(c.if_none_match, v.etag, strong=False):
            return (304 if method in GET_HEAD else 412), "If-None-Match"
    elif c.if_modified_since is not None and method in GET_HEAD and v is not None:
        date = parse_http_date(c.if_modified_since)
        if date is not None and v.last_modified is not None and v.last_modified <= date:
            return 304, "If-Modified-Since"
    return None


def if_range_holds(text: str, v: Validators) -> bool:
    """The If-Range condition (§13.1.5): an entity-tag must match the ETag by strong
    comparison; an HTTP-date must be a strong validator and equal Last-Modified
    exactly. Anything else (a weak tag, an invalid value) is false."""
    if text.startswith(('"', "W/")):
        tag = parse_entity_tag(text)
        return tag is not None and strong_match(tag, v.etag)
    date = parse_http_date(text)
    return date is not None and v.date_is_strong and date == v.last_modified


# -- §14 ranges -----------------------------------------------------------------------------------
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")
_HUGE = 10**18  # stands for any number with more digits (no file is that long)
RangeSpec = tuple[int | None, int | None]  # (first, last) or (None, suffix-length)


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return _HUGE if len(digits) > 18 else int(digits)


def parse_range(text: str) -> tuple[RangeSpec, ...] | None:
    """A ``Range`` field -> its byte range specs in order, or None to ignore the field.

    Grammar of §14.1.1/§14.1.2: ``range-unit "=" 1#range-spec`` with no
    whitespace before ``=`` or inside a spec, OWS around list elements (also
    right after ``=``, leniently), empty list elements skipped (§5.6.1), the
    unit case-insensitive. Numbers of more than 18 digits count as 10**18. None when the unit is not
    ``bytes`` (§14.2: MUST ignore), the set is invalid (bad grammar, an
    ``int-range`` with ``last < first``, no spec at all) or holds more than
    :data:`MAX_RANGES` specs (§14.2 allows ignoring both).
    """
    unit, eq, rest = text.partition("=")
    if not eq or not _TOKEN.fullmatch(unit) or unit.lower() != "bytes":
        return None
    specs: list[RangeSpec] = []
    for item in rest.split(","):
        item = item.strip(" \t")
        if not item:
            continue
        if len(specs) == MAX_RANGES:
            return None
        if m := _INT_RANGE.fullmatch(item):
            first = _number(m[1])
            last = _number(m[2]) if m[2] else None
            if last is not None and last < first:
                return None
            specs.append((first, last))
        elif m := _SUFFIX_RANGE.fullmatch(item):
            specs.append((None, _number(m[1])))
        else:
            return None
    return tuple(specs) or None


@dataclass(frozen=True, slots=True)
class Selection:
    """What to send: 200 (the whole file), 206 with ``spans`` (half-open
    ``(start, stop)`` byte offsets, one part each) or 416."""

    status: Literal[200, 206, 416]
    spans: tuple[tuple[int, int], ...] = ()


def select_ranges(specs: Sequence[RangeSpec], length: int) -> Selection:
    """Resolve byte range specs against a representation of ``length`` bytes (§14.1.2, §14.2).

    An int-range is satisfiable if ``first < length`` (``last`` beyond the end
    is clipped); a suffix-range if its length is non-zero (longer than the file:
    the whole file). None satisfiable: 416. For an empty file a non-zero suffix
    is satisfiable but selects no bytes, which 206 cannot express: 200.
    Overlapping or nearly adjacent spans are coalesced (then in ascending
    order), otherwise the request's order is kept (§15.3.7).
    """
    spans: list[tuple[int, int]] = []
    satisfiable = False
    for first, last in specs:
        if first is None:
            assert last is not None
            if last > 0:
                satisfiable = True
                if length:
                    spans.append((max(0, length - last), length))
        elif first < length:
            satisfiable = True
            spans.append((first, length if last is None else min(last + 1, length)))
    if not satisfiable:
        return Selection(416)
    if not spans:
        return Selection(200)
    ordered = sorted(spans)
    if any(b[0] < a[1] + MERGE_GAP for a, b in pairwise(ordered)):
        merged = [ordered[0]]
        for start, stop in ordered[1:]:
            if start < merged[-1][1] + MERGE_GAP:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        spans = merged
    return Selection(206, tuple(spans))


def choose(method: str, c: Conditions, v: Validators, length: int) -> Selection:
    """Step 5 of §13.2.2 and §14.2: the Range field applies only to GET, only if
    valid and of the bytes unit, and only if If-Range (when present) holds."""
    if method != "GET" or c.range is None:
        return Selection(200)
    if c.if_range is not None and not if_range_holds(c.if_range, v):
        return Selection(200)
    specs = parse_range(c.range)
    return Selection(200) if specs is None else select_ranges(specs, length)


# -- the response ---------------------------------------------------------------------------------
_ENCODED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                  "xz": "application/x-xz", "br": "application/x-brotli",
                  "compress": "application/x-compress"}


def content_type(name: str) -> str:
    """The media type for a file name; a compressed file is served as itself
    (``x.tar.gz`` is ``application/gzip``, never ``Content-Encoding: gzip``)."""
    ct, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        return _ENCODED_TYPES.get(encoding, "application/octet-stream")
    return ct or "application/octet-stream"


async def check_put(request: web.Request, path: str, *, label: str,
                    executor: Executor | None = None) -> None:
    """Preconditions of a PUT to ``path`` (RFC 9110 §13.1.1 If-Match, §13.1.4
    If-Unmodified-Since, §13.1.2 If-None-Match; ``If-None-Match: *`` makes it
    create-only). Raises ``PreconditionFailed`` (412) if one fails. A file in the way
    of the target's folder is left to the 409 the caller answers next (§13.2.1).
    A ``Content-Range`` (a partial PUT) is a ``ProtocolError`` (400): RFC 9110 §14.5
    says a server that does not support partial PUT MUST reject it, since taking the
    fragment for the whole file would replace the file with it."""
    if "Content-Range" in request.headers:
        raise ProtocolError(f"{label}: partial PUT (Content-Range) is not supported; send the "
                            "whole file", kind=ErrorKind.BAD_REQUEST)
    cond = Conditions.from_headers(request.headers)
    if cond.if_match is None and cond.if_none_match is None and cond.if_unmodified_since is None:
        return
    loop = asyncio.get_running_loop()
    try:
        st: os.stat_result | None = await loop.run_in_executor(executor, os.stat, path)
    except NotADirectoryError:
        return
    except FileNotFoundError:
        st = None
    v = None if st is None else Validators.of(st, time.time())
    failed = check_preconditions(request.method, cond, v)
    if failed is not None:
        raise PreconditionFailed(f"{label}: precondition failed ({failed[1]})")


def _open(path: str) -> tuple[int, os.stat_result]:
    # O_NONBLOCK: opening a FIFO must not hang the thread; harmless for regular files
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


async def serve_file(request: web.Request, path: str, *, label: str,
                     executor: Executor | None = None) -> web.StreamResponse:
    """Answer GET/HEAD for the file at ``path`` (already confined); ``label`` names it in errors.

    Opens the file once: validators and bytes come from the same open file, so
    a file replaced meanwhile is served whole in one version. Raises
    ``PathError`` (403: not a regular file or no permission, 404: gone) and
    ``PreconditionFailed`` (412) for the error middleware; answers 304 and 416 itself.
    """
    loop = asyncio.get_running_loop()
    try:
        fd, st = await loop.run_in_executor(executor, _open, path)
    except (FileNotFoundError, NotADirectoryError):
        raise PathError(f"{label}: no such file", kind=ErrorKind.NOT_FOUND) from None
    except PermissionError:
        raise PathError(f"{label}: permission denied", kind=ErrorKind.FORBIDDEN) from None
    try:
        if not stat.S_ISREG(st.st_mode):
            raise PathError(f"{label}: not a regular file", kind=ErrorKind.FORBIDDEN)
        return await _respond(request, fd, st, label, executor)
    finally:
        os.close(fd)


async def _respond(request: web.Request, fd: int, st: os.stat_result, label: str,
                   executor: Executor | None) -> web.StreamResponse:
    v = Validators.of(st, time.time())
    cond = Conditions.from_headers(request.headers)
    failed = check_preconditions(request.method, cond, v)
    if failed is not None and failed[0] == 412:
        raise PreconditionFailed(f"{label}: precondition failed ({failed[1]})")
    if failed is not None:
        # 304 (§15.4.5): ETag, and Last-Modified for caches that refresh their stored
        # headers from it (metadata that guides cache updates); no body, no Content-Length
        resp = web.StreamResponse(status=304, headers=v.headers())
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    length = st.st_size
    sel = choose(request.method, cond, v, length)
    ctype = content_type(label)
    if sel.status == 416:
        log.warning("%s %s %s: range not satisfiable (%s; length %d)", request.remote,
                    request.method, request.path, cond.range, length)
        return web.json_response(
            {"error": f"{label}: range not satisfiable, the file has {length} bytes"},
            status=416, headers={"Content-Range": f"bytes */{length}", "Accept-Ranges": "bytes"})
    headers = {**v.headers(), "Accept-Ranges": "bytes"}
    if sel.status == 200 or len(sel.spans) == 1:
        start, stop = sel.spans[0] if sel.spans else (0, length)
        if sel.status == 206:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{length}"
        resp = web.StreamResponse(status=sel.status, headers={**headers, "Content-Type": ctype})
        resp.content_length = stop - start
        await resp.prepare(request)
        if request.method != "HEAD":
            await _send(request, resp, fd, start, stop, executor)
        await resp.write_eof()  # after a short send: a no-op, the connection is closing
        return resp
    # several parts: multipart/byteranges (§14.6)
    boundary = secrets.token_hex(16)
    heads = [(b"\r\n" if i else b"") + (f"--{boundary}\r\nContent-Type: {ctype}\r\n"
             f"Content-Range: bytes {a}-{b - 1}/{length}\r\n\r\n").encode()
             for i, (a, b) in enumerate(sel.spans)]
    tail = f"\r\n--{boundary}--\r\n".encode()
    resp = web.StreamResponse(status=206, headers={
        **headers, "Content-Type": f"multipart/byteranges; boundary={boundary}"})
    resp.content_length = sum(map(len, heads)) + sum(b - a for a, b in sel.spans) + len(tail)
    await resp.prepare(request)
    for head, (a, b) in zip(heads, sel.spans, strict=True):
        await resp.write(head)
        if not await _send(request, resp, fd, a, b, executor):
            return resp
    await resp.write(tail)
    await resp.write_eof()
    return resp


async def _send(request: web.Request, resp: web.StreamResponse, fd: int, start: int, stop: int,
                executor: Executor | None) -> bool:
    """Send bytes ``[start, stop)`` of ``fd`` in :data:`CHUNK`-sized reads (bounded
    memory: ``write`` waits for the socket to drain). No ``sendfile``: the daemon
    runs on uvloop, whose ``loop.sendfile`` is not implemented.

    Returns False if the file ended early (truncated meanwhile) or could not be
    read: the connection is then closed after what was sent, so the client sees
    a short body instead of waiting for bytes that will never come (or reading
    the next response as this one's body)."""
    loop = asyncio.get_running_loop()
    pos = start
    try:
        while pos < stop:
            chunk = await loop.run_in_executor(executor, os.pread, fd, min(CHUNK, stop - pos), pos)
            if not chunk:
                break
            await resp.write(chunk)
            pos += len(chunk)
    except OSError as exc:
        if isinstance(exc, ConnectionError):
            raise
        problem = f"read error after {pos - start} of {stop - start} bytes: {exc.strerror or exc}"
    else:
        if pos == stop:
            return True
        problem = f"the file shrank while being sent ({pos - start} of {stop - start} bytes)"
    log.warning("%s %s %s: %s", request.remote, request.method, request.path, problem)
    resp.force_close()
    if request.transport is not None:
        request.transport.close()
    return False

"""The control API's request bodies, as typed messages parsed strictly from JSON.

One frozen dataclass per request body (``docs/protocol.md``, "Control API"),
each with a ``from_json`` that checks every field's JSON type and bounds and
raises ``ProtocolError`` (HTTP 400) with a message naming the field, and a
``to_json`` the client (``fallback.client.control``) sends: both ends share one
definition of each message. The answers are in ``fallback.answers``. The
daemon's handlers work on these messages only, never on raw dicts, so a
malformed body (a float where an integer belongs, a boolean, a missing key, an
unknown action, ``2**70``) is refused in one place, before any work.

What only the session can decide (is file 7 a file of this manifest, is block
range ``[0, 10**10)`` inside it) is checked against the manifest by
``fallback.sessions`` and ``BlockSender``; the bounds here only keep parsing
itself bounded. Unknown keys are ignored, so a newer client can add optional
fields without breaking an older daemon.

Limits (besides the 64 MiB body limit of ``server.MAX_CONTROL_BODY``):
at most ``manifest.MAX_ENTRIES`` items in a plan or commit, at most
``MAX_RANGES`` ranges in a ``want`` and ``MAX_DIGESTS`` blocks in a ``digests``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fallback.jsonbody import Items
from transport.blocks.manifest import MAX_ENTRIES, MAX_PATH_BYTES, FileEntry, entries_from_json
from transport.blocks.plan import OVERWRITE_MODES
from transport.errors import ProtocolError

MAX_RANGES = 1 << 16
"""Ranges one ``want`` call may name: the client sends one per file and missing run,
at most this many per call (it splits a larger want into several calls), so one
call costs the daemon's event loop tens of milliseconds, not seconds."""
MAX_DIGEST_READ = 64 << 20
"""Source bytes one ``/digests`` call reads at most (at least one block, so every call
makes progress): blocks asked for beyond it are left out of the answer, and a root
not reached is answered ``pending`` (the client calls again; blocks read stay
recorded in ``SentSource``). Each block is one executor job, so other requests on
the daemon's I/O pool interleave with a long verification."""
MAX_DIGESTS = 4096
"""Blocks (or files) one ``/digests`` call may name: each costs the daemon a read of a
block (up to 64 MiB), so one call is bounded to a few GiB of reading at most."""
MAX_ERROR_TEXT = 500
"""A client's closing error is logged: cut to this many characters, on one line."""
MAX_ROOT_TEXT = 128
"""``b3blocks:`` and 64 hex digits fit easily."""
PLAN_ACTIONS = ("skip", "fresh", "resume")
_MAX_INDEX = (1 << 63) - 1


# -- decoding ----------------------------------------------------------------------------------------
def loads(raw: bytes) -> dict[str, Any]:
    """The JSON object of a control body (``{}`` for an empty one); raises ``ProtocolError``.

    ``json.loads`` recurses once per nesting level, so 100,000 nested arrays
    end in ``RecursionError`` (after about 1,000 levels, quickly): that is a
    malformed body too, not an internal error. Our bodies nest 4 levels deep.
    """
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ProtocolError("control request is nested too deeply") from None
    except ValueError:  # also non-UTF-8 bytes and integers of more than 4300 digits
        raise ProtocolError("control request is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"control request must be a JSON object, not {_kind(body)}")
    return body


# -- field readers -----------------------------------------------------------------------------------
_REQUIRED: Any = object()


def _get(d: dict[str, Any], key: str, default: Any, where: str) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise ProtocolError(f"{where}: missing {key!r}")
    return default


def _int(d: dict[str, Any], key: str, where: str, *, lo: int = 0, hi: int = _MAX_INDEX,
         default: Any = _REQUIRED) -> int:
    value = _get(d, key, default, where)
    return _check_int(value, f"{where}: {key}", lo, hi)


def _check_int(value: Any, what: str, lo: int = 0, hi: int = _MAX_INDEX) -> int:
    if type(value) is not int:  # not bool (an int subclass), not 1.0, not "1"
        raise ProtocolError(f"{what} must be an integer, not {_kind(value)}")
    if not lo <= value <= hi:
        shown = value if value.bit_length() <= 64 else "a huge number"
        raise ProtocolError(f"{what} {shown} outside [{lo}, {hi}]")
    return value


def _bool(d: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = _get(d, key, default, where)
    if type(value) is not bool:
        raise ProtocolError(f"{where}: {key} must be true or false, not {_kind(value)}")
    return value


def _str(d: dict[str, Any], key: str, where: str, *, default: Any = _REQUIRED,
         max_len: int = MAX_PATH_BYTES) -> str:
    value = _get(d, key, default, where)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: {key} must be a string, not {_kind(value)}")
    if len(value) > max_len:
        raise ProtocolError(f"{where}: {key} longer than {max_len} characters")
    return value


def _list(d: dict[str, Any], key: str, where: str, max_items: int, *,
          default: Any = _REQUIRED) -> list[Any]:
    value = _get(d, key, default, where)
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: {key} must be a list, not {_kind(value)}")
    if len(value) > max_items:
        raise ProtocolError(f"{where}: {key} has {len(value)} items, more than {max_items}")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be an object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """A JSON type name for messages (never the value itself: it may be huge)."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number with a fraction",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# -- bandwidth ---------------------------------------------------------------------------------------
POLICIES = ("fixed", "high", "fair", "low")
MAX_RATE = 1 << 50
"""Largest rate in bits per second a message may name (about a petabit per second)."""


@dataclass(frozen=True, slots=True)
class Flow:
    """``{target_rate, min_rate, policy}``: rates in bits per second (0: no cap, no floor)
    and a policy (``transport.blocks.pacing``: Aspera's ``fixed``, ``high``, ``fair``,
    ``low``). In an open request what the client asks; in the answer what applies, the
    server's ``<transfer><in|out><bandwidth><flow>`` having won."""

    target_rate: int = 0
    min_rate: int = 0
    policy: str = "fair"

    def to_json(self) -> dict[str, Any]:
        return {"target_rate": self.target_rate, "min_rate": self.min_rate,
                "policy": self.policy}

    @classmethod
    def from_json(cls, value: Any, where: str = "flow") -> Flow:
        d = _obj(value, where)
        policy = _str(d, "policy", where, default="fair", max_len=16)
        if policy not in POLICIES:
            raise ProtocolError(f"{where}: unknown policy {policy!r} (one of {', '.join(POLICIES)})")
        target = _int(d, "target_rate", where, hi=MAX_RATE, default=0)
        floor = _int(d, "min_rate", where, hi=MAX_RATE, default=0)
        if target and floor > target:
            raise ProtocolError(f"{where}: min_rate {floor} above target_rate {target}")
        return cls(target, floor, policy)


def _flow(d: dict[str, Any]) -> Flow | None:
    return Flow.from_json(d["flow"]) if d.get("flow") is not None else None


# -- POST /session -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OpenUpload:
    """``{direction: "upload", path, into_dir, name, entries, overwrite, encrypt, strong_pass,
    flow?}``."""

    path: str
    into_dir: bool
    name: str
    entries: tuple[FileEntry, ...]
    overwrite: str
    encrypt: bool
    strong_pass: bool
    flow: Flow | None = None  # the rate the client asks for (``--target-rate``)

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """``lazy``: the entries as ``jsonbody.Items`` (the client's body, encoded a slice at
        a time: ``fallback.jsonbody``)."""
        entries: Any = Items(self.entries, FileEntry.to_json) if lazy \
            else [e.to_json() for e in self.entries]
        d = {"direction": "upload", "path": self.path, "into_dir": self.into_dir,
             "name": self.name, "entries": entries,
             "overwrite": self.overwrite, "encrypt": self.encrypt,
             "strong_pass": self.strong_pass}
        if self.flow is not None:
            d["flow"] = self.flow.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpenUpload:
        w = "upload"
        overwrite = _str(d, "overwrite", w, default="diff", max_len=16)
        if overwrite not in OVERWRITE_MODES:
            raise ProtocolError(f"unknown overwrite policy {overwrite!r} "
                                f"(one of {', '.join(OVERWRITE_MODES)})")
        if "entries" not in d:
            raise ProtocolError("upload needs a non-empty 'entries' list")
        return cls(
            path=_str(d, "path", w, default="/"),
            into_dir=_bool(d, "into_dir", w),
            name=_str(d, "name", w, default=""),
            entries=tuple(entries_from_json(d["entries"])),
            overwrite=overwrite,
            encrypt=_bool(d, "encrypt", w),
            strong_pass=_bool(d, "strong_pass", w),
            flow=_flow(d),
        )


@dataclass(frozen=True, slots=True)
class OpenDownload:
    """``{direction: "download", path, flow?}``."""

    path: str
    flow: Flow | None = None  # the rate the client asks for (``--target-rate``)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"direction": "download", "path": self.path}
        if self.flow is not None:
            d["flow"] = self.flow.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpenDownload:
        return cls(path=_str(d, "path", "download", default="/"), flow=_flow(d))


def parse_open(d: dict[str, Any]) -> OpenUpload | OpenDownload:
    direction = d.get("direction")
    if direction == "upload":
        return OpenUpload.from_json(d)
    if direction == "download":
        return OpenDownload.from_json(d)
    raise ProtocolError("direction must be 'upload' or 'download'")


# -- POST /session/{id}/plan -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PlanItem:
    """``{file, action: skip|fresh|resume, entry?, rebase?, drop?}``: ``entry`` is the final
    manifest entry (an envelope's header is only known once the sender has seen the
    target's state). With ``resume``: ``rebase`` (the source's mtime moved on since the
    partial was started; ``--resume full`` compared every kept block) and ``drop``, the
    kept blocks whose source bytes changed, as ``[[start, stop], ...]`` (at most
    ``MAX_RANGES``): the receiver forgets them and reports them missing."""

    file: int
    action: str
    entry: FileEntry | None = None
    rebase: bool = False
    drop: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "action": self.action}
        if self.entry is not None:
            d["entry"] = self.entry.to_json()
        if self.rebase:
            d["rebase"] = True
        if self.drop:
            d["drop"] = [list(r) for r in self.drop]
        return d

    @classmethod
    def from_json(cls, value: Any, k: int) -> PlanItem:
        w = f"plan item {k}"
        d = _obj(value, w)
        file = _int(d, "file", w)
        action = _str(d, "action", w, max_len=16)
        if action not in PLAN_ACTIONS:
            raise ProtocolError(f"{w}: unknown action {action!r} (one of {', '.join(PLAN_ACTIONS)})")
        entry = FileEntry.from_json(d["entry"]) if d.get("entry") is not None else None
        rebase = _bool(d, "rebase", w)
        drop: list[tuple[int, int]] = []
        for k2, item in enumerate(_list(d, "drop", w, MAX_RANGES, default=[])):
            w2 = f"{w}: drop item {k2}"
            if not isinstance(item, list) or len(item) != 2:
                raise ProtocolError(f"{w2} must be [start, stop], not {_kind(item)}")
            start, stop = (_check_int(x, f"{w2}: {n}") for x, n in zip(
                item, ("start", "stop"), strict=True))
            if start >= stop:
                raise ProtocolError(f"{w2}: empty range [{start}, {stop})")
            drop.append((start, stop))
        if (rebase or drop) and action != "resume":
            raise ProtocolError(f"{w}: rebase and drop go with action 'resume' only")
        return cls(file, action, entry, rebase, tuple(drop))


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """``{files: [PlanItem, ...]}``, each file at most once."""

    files: tuple[PlanItem, ...]

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """``lazy``: as ``OpenUpload.to_json``."""
        if lazy:
            return {"files": Items(self.files, PlanItem.to_json)}
        return {"files": [i.to_json() for i in self.files]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanRequest:
        raw = _list(d, "files", "plan", MAX_ENTRIES)
        items = tuple(PlanItem.from_json(v, k) for k, v in enumerate(raw))
        _unique((i.file for i in items), "plan")
        return cls(items)


# -- POST /session/{id}/commit -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CommitItem:
    """``{file, root?}``: ``root`` is the sender's whole-file digest (``b3blocks:<hex>``)."""

    file: int
    root: str | None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "root": self.root}

    @classmethod
    def from_json(cls, value: Any, k: int) -> CommitItem:
        w = f"commit item {k}"
        d = _obj(value, w)
        root = d.get("root")
        if root is not None:
            root = _str(d, "root", w, max_len=MAX_ROOT_TEXT)
        return cls(_int(d, "file", w), root)


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """``{files: [CommitItem, ...]}``, each file at most once."""

    files: tuple[CommitItem, ...]

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """``lazy``: as ``OpenUpload.to_json``."""
        if lazy:
            return {"files": Items(self.files, CommitItem.to_json)}
        return {"files": [i.to_json() for i in self.files]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommitRequest:
        raw = _list(d, "files", "commit", MAX_ENTRIES)
        items = tuple(CommitItem.from_json(v, k) for k, v in enumerate(raw))
        _unique((i.file for i in items), "commit")
        return cls(items)


# -- POST /session/{id}/digests ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DigestsRequest:
    """``{file, blocks: [int, ...], root: bool}``: digests of some source blocks and,
    with ``root``, the whole-file digest. ``blocks`` is sorted and deduplicated."""

    file: int
    blocks: tuple[int, ...]
    root: bool

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "blocks": list(self.blocks), "root": self.root}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DigestsRequest:
        w = "digests"
        raw = _list(d, "blocks", w, MAX_DIGESTS, default=[])
        blocks = sorted({_check_int(b, f"{w}: block {k}") for k, b in enumerate(raw)})
        return cls(_int(d, "file", w), tuple(blocks), _bool(d, "root", w))


@dataclass(frozen=True, slots=True)
class RootsRequest:
    """``{roots: [file, ...]}``: whole-file digests over the sources' current bytes (the
    client's check before it publishes downloaded files). At most ``MAX_DIGESTS`` files."""

    files: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"roots": list(self.files)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RootsRequest:
        raw = _list(d, "roots", "digests", MAX_DIGESTS)
        return cls(tuple(sorted({_check_int(f, f"digests: roots item {k}")
                                 for k, f in enumerate(raw)})))


def parse_digests(d: dict[str, Any]) -> DigestsRequest | RootsRequest:
    """A ``/digests`` body: the ``roots`` form when it has that key, else block digests."""
    return RootsRequest.from_json(d) if "roots" in d else DigestsRequest.from_json(d)


# -- POST /session/{id}/want -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WantRequest:
    """``{blocks: [[file, start, stop], ...]}``: half-open block ranges to queue.

    Only shapes and signs are checked here; ``BlockSender.add_ranges`` checks each
    range against its file's block count before queuing any.
    """

    ranges: tuple[tuple[int, int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"blocks": [list(r) for r in self.ranges]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WantRequest:
        raw = _list(d, "blocks", "want", MAX_RANGES)
        out: list[tuple[int, int, int]] = []
        for k, item in enumerate(raw):
            w = f"want: item {k}"
            if not isinstance(item, list) or len(item) != 3:
                raise ProtocolError(f"{w} must be [file, start, stop], not {_kind(item)}")
            f, start, stop = (_check_int(x, f"{w}: {n}") for x, n in zip(
                item, ("file", "start", "stop"), strict=True))
            if start >= stop:
                raise ProtocolError(f"{w}: empty range [{start}, {stop})")
            out.append((f, start, stop))
        return cls(tuple(out))


# -- POST /session/{id}/acks -------------------------------------------------------------------------
MAX_ACK_BLOCKS = 1 << 16
"""Blocks one acknowledgement message may name in all (each costs the sender a step)."""

BlockRanges = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Acks:
    """``{journaled: [[file, start, stop], ...], failed: [[file, start, stop], ...]}``.

    A receiver's acknowledgements: blocks it journaled (the sender retires them) and
    blocks it discarded (failed digest, refused: the sender sends them again). The
    client's report on a download, the daemon's answer on an upload (``docs/protocol.md``).
    At most ``MAX_ACK_BLOCKS`` blocks in all; ranges are checked against the files by
    the sender (``BlockSender.acks``).
    """

    journaled: BlockRanges = ()
    failed: BlockRanges = ()

    def to_json(self) -> dict[str, Any]:
        return {"journaled": [list(r) for r in self.journaled],
                "failed": [list(r) for r in self.failed]}

    @property
    def blocks(self) -> int:
        return sum(b - a for _, a, b in self.journaled) + sum(b - a for _, a, b in self.failed)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Acks:
        out = cls(_block_ranges(d, "journaled", "acks"), _block_ranges(d, "failed", "acks"))
        if out.blocks > MAX_ACK_BLOCKS:
            raise ProtocolError(f"acks: {out.blocks} blocks, more than {MAX_ACK_BLOCKS}")
        return out

    @classmethod
    def from_pairs(cls, journaled: list[tuple[int, int]], failed: list[tuple[int, int]]) -> Acks:
        """From ``(file, block)`` pairs, merged into ranges."""
        return cls(_merge(journaled), _merge(failed))


def _block_ranges(d: dict[str, Any], key: str, where: str) -> BlockRanges:
    out: list[tuple[int, int, int]] = []
    for k, item in enumerate(_list(d, key, where, MAX_ACK_BLOCKS, default=[])):
        w = f"{where}: {key} item {k}"
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError(f"{w} must be [file, start, stop], not {_kind(item)}")
        f, start, stop = (_check_int(x, f"{w}: {n}") for x, n in zip(
            item, ("file", "start", "stop"), strict=True))
        if start >= stop:
            raise ProtocolError(f"{w}: empty range [{start}, {stop})")
        out.append((f, start, stop))
    return tuple(out)


def _merge(pairs: list[tuple[int, int]]) -> BlockRanges:
    out: list[tuple[int, int, int]] = []
    for f, b in sorted(set(pairs)):
        if out and out[-1][0] == f and out[-1][2] == b:
            out[-1] = (f, out[-1][1], b + 1)
        else:
            out.append((f, b, b + 1))
    return tuple(out)


# -- POST /session/{id}/keepalive ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeepaliveRequest:
    """``{}``: the client is alive (``fallback.sessions.IDLE_TAKEOVER``)."""

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeepaliveRequest:
        return cls()


# -- DELETE /session/{id} ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CloseRequest:
    """``{error?: string}``: why the client gave up, for the daemon's session log line
    (cut to ``MAX_ERROR_TEXT`` characters, control characters replaced, so a client
    cannot forge log lines)."""

    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CloseRequest:
        err = d.get("error")
        if err is None or err == "":
            return cls(None)
        if not isinstance(err, str):
            raise ProtocolError(f"close: error must be a string, not {_kind(err)}")
        text = "".join(c if c.isprintable() else " " for c in err[:MAX_ERROR_TEXT])
        return cls(text)


def _unique(files: Any, where: str) -> None:
    seen: set[int] = set()
    for f in files:
        if f in seen:
            raise ProtocolError(f"{where}: file {f} named twice")
        seen.add(f)

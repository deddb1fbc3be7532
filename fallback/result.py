"""What a transfer reports: the result object, progress events, the rate meter.

``TransferResult.to_json`` is a public contract (scripts parse the CLI's
``--json`` line): keys are only ever added, never renamed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Sent to the progress callback, at most every ``Progress.INTERVAL`` seconds and at the end."""

    bytes_done: int  # carried + skipped, file bytes
    bytes_total: int
    rate_bps: float  # recent rate of carried bytes, bits per second
    file: str  # current file (display path)
    transport: str
    done: bool = False
    files_done: int = 0  # files whose every byte is there (carried or kept)
    files_total: int = 0
    bytes_resumed: int = 0  # of bytes_done, those already there (resumed or unchanged)
    switch: str = ""
    """Set on the event sent when the transfer moved to another transport:
    ``"https -> http: <reason>"`` (``TransferResult.use``); empty otherwise."""

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass(slots=True)
class TransferResult:
    """What a transfer did; ``to_json`` gives the CLI's ``--json`` object.

    ``ok`` with ``checksums[path]`` means the file at the destination holds the
    source's bytes, read back and checked. How far that check went is
    ``verified``: ``"full"`` when every block of every file in ``checksums`` was
    checked against the source's current bytes this run (a fresh transfer; a
    resume in mode ``full``, where the sender re-read every block the receiver
    kept; every download, whose final check covers the daemon's current bytes;
    a file skipped by ``--overwrite diff`` because its digest matched);
    ``"sampled"`` when at least one file was resumed by ``attrs`` or ``sparse``
    trusting blocks it did not compare with the source (an upload only). It is
    the weakest over all files; ``verified_files`` names each file below
    ``"full"`` with its level (``{}`` when ``verified`` is ``"full"``). Files
    skipped because they exist (``never``, ``older``) are not in ``checksums``
    and not counted. A failed run (``ok`` false) reports ``verified`` as ``null``.
    ``hole_bytes``: bytes of blocks lying wholly in holes of a sparse source, moved as
    hole frames (no payload) and kept as holes at the destination; they are in neither
    ``sent_bytes`` nor ``skipped_bytes``.
    """

    ok: bool = False
    direction: str = ""
    transports: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    sent_bytes: int = 0
    skipped_bytes: int = 0
    hole_bytes: int = 0
    seconds: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)
    skipped_files: dict[str, str] = field(default_factory=dict)  # path -> reason
    content: dict[str, str] = field(default_factory=dict)  # path -> plain|envelope|decrypted
    error: str | None = None
    verified: str = "full"  # "full" | "sampled": the weakest over the files in checksums
    verified_files: dict[str, str] = field(default_factory=dict)  # path -> level, below "full" only
    retransmitted_bytes: int = 0  # UDP: piece bytes this client sent again (0 on HTTP)
    loss_pct: float = 0.0  # UDP: datagrams this client declared lost, % of those resolved
    rtt_ms: float = 0.0  # UDP: smoothed round-trip time of the path (0: not measured)
    datagram_size: int = 0  # UDP: bytes per data datagram the sender ended at (0: no UDP)
    would_transfer: list[str] = field(default_factory=list)  # --dry-run: what would move
    dry_run: bool = False
    stdio: str | None = None  # "stdin" | "stdout": what - stood for (see the README)
    stored_as: dict[str, str] = field(default_factory=dict)  # --encrypt: path -> envelope name
    removed: list[str] = field(default_factory=list)  # --remove-after-transfer: sources deleted
    transport_reason: str = ""  # why the first transport was chosen (a URL, a fallback, a proxy)
    switches: list[Switch] = field(default_factory=list)  # each move to another transport
    proxy: str | None = None  # the proxy's http://host:port when one was used, no credentials
    retries: int = 0  # re-connections after every path was down
    udp_reason: str = ""  # why UDP is not carrying the blocks at the end ("" when it is or not tried)
    block_size: int = 0
    """The block size the whole-file digests in ``checksums`` were computed with (they
    depend on it): ``fallback checksum --block-size N FILE`` prints the same digest. An
    upload's is ``--block-size`` (4 MiB by default), a download's the daemon's; 0 when
    no file was planned."""
    block_sizes: dict[str, int] = field(default_factory=dict)
    """Files whose digest used another block size than ``block_size`` (path -> bytes);
    ``{}`` when every file used it."""

    def note_block_sizes(self, sizes: dict[str, int]) -> None:
        """Each planned file's block size (path -> bytes): the most common one becomes
        ``block_size``, the others are listed in ``block_sizes``."""
        if not sizes:
            return
        counts: dict[int, int] = {}
        for n in sizes.values():
            counts[n] = counts.get(n, 0) + 1
        self.block_size = max(counts, key=lambda n: counts[n])
        self.block_sizes = {k: n for k, n in sizes.items() if n != self.block_size}

    def use(self, kind: str, reason: str, at: float) -> Switch | None:
        """The transfer carries its blocks over ``kind`` (``"https"``, ``"http"``,
        ``"udp"``) from ``at`` seconds on, because of ``reason``. The first call sets
        ``transport_reason``; a later one with another kind than the last appends to
        ``transports`` and returns the ``Switch`` it recorded in ``switches``; the same
        kind again returns None. Path-kind-agnostic: every switch goes through here."""
        if not self.transports:
            self.transports.append(kind)
            self.transport_reason = reason
            return None
        if self.transports[-1] == kind:
            return None
        sw = Switch(round(at, 3), self.transports[-1], kind, reason)
        self.transports.append(kind)
        self.switches.append(sw)
        return sw

    def mark_verified(self, path: str, level: str) -> None:
        """Record how far ``path``'s check went (``"full"`` or ``"sampled"``)."""
        if level == "full":
            self.verified_files.pop(path, None)
        else:
            self.verified_files[path] = level
        self.verified = "sampled" if self.verified_files else "full"

    @property
    def rate_mbps(self) -> float:
        """Megabits per second of the bytes this run carried (``sent_bytes``, not the
        total ``bytes``: skipped and resumed bytes did not move); 0 when nothing moved."""
        return self.sent_bytes * 8 / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "transports": list(self.transports),
            "files": self.files,
            "bytes": self.bytes,
            "sent_bytes": self.sent_bytes,
            "skipped_bytes": self.skipped_bytes,
            "hole_bytes": self.hole_bytes,
            "seconds": round(self.seconds, 6),
            "rate_mbps": round(self.rate_mbps, 3),
            "checksums": dict(self.checksums),
            "error": self.error,
            "direction": self.direction,
            "skipped_files": dict(self.skipped_files),
            "content": dict(self.content),
            "verified": self.verified if self.ok else None,  # a failed run verified nothing as a whole
            "verified_files": dict(self.verified_files),
            "retransmitted_bytes": self.retransmitted_bytes,
            "loss_pct": round(self.loss_pct, 3),
            "rtt_ms": round(self.rtt_ms, 3),
            "datagram_size": self.datagram_size,
            "dry_run": self.dry_run,
            "would_transfer": list(self.would_transfer),
            "stdio": self.stdio,
            "stored_as": dict(self.stored_as),
            "removed": list(self.removed),
            "transport_reason": self.transport_reason,
            "switches": [sw.to_json() for sw in self.switches],
            "udp_reason": self.udp_reason,
            "proxy": self.proxy,
            "retries": self.retries,
            "block_size": self.block_size,
            "block_sizes": dict(self.block_sizes),
        }


@dataclass(frozen=True, slots=True)
class Switch:
    """One move to another transport, ``at`` seconds after the transfer started."""

    at: float
    from_: str
    to: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.from_, "to": self.to, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.from_} -> {self.to}: {self.reason}"


ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Counts carried and skipped bytes and emits rate-limited events."""

    INTERVAL = 0.2
    WINDOW = 2.0

    def __init__(self, total: int, transport: str, callback: ProgressCallback | None,
                 sizes: dict[str, int] | None = None) -> None:
        self.total = total
        self.transport = transport
        self.callback = callback
        self.carried = 0
        self.skipped = 0
        self.holes = 0
        self.file = ""
        self.sizes = dict(sizes or {})  # display name -> file bytes, for "k/n files"
        self._there: dict[str, int] = {}  # display name -> bytes carried or kept
        self._done = 0
        self._last_emit = 0.0
        self._samples: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def _count(self, file: str, n: int) -> None:
        if file not in self.sizes:
            return
        before = self._there.get(file, 0)
        after = self._there[file] = before + n
        size = self.sizes[file]
        self._done += (after >= size) - (before >= size)

    def skip(self, n: int, file: str = "") -> None:
        self.skipped += n
        self._count(file, n)

    def hole(self, n: int, file: str = "") -> None:
        """``n`` bytes moved as a hole of a sparse file: done, but not carried as data."""
        self.holes += n
        self._count(file, n)

    def unskip(self, n: int, file: str = "") -> None:
        """Take back bytes counted as already there that must be carried after all
        (a kept block failed re-verification at the receiver)."""
        self.skipped -= n
        self._count(file, -n)

    def carry(self, n: int, file: str = "") -> None:
        self.carried += n
        if file:
            self.file = file
            self._count(file, n)
        now = time.monotonic()
        if now - self._last_emit >= self.INTERVAL:
            self._last_emit = now
            self._samples.append((now, self.carried))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW:
                self._samples.pop(0)
            self._emit(False)

    def rate(self) -> float:
        (t0, b0), (t1, b1) = self._samples[0], (time.monotonic(), self.carried)
        return (b1 - b0) * 8 / (t1 - t0) if t1 > t0 else 0.0

    def finish(self) -> None:
        """The transfer succeeded: the last event (``done``). Empty files count as done
        here: no byte of theirs ever moves to count them by (the last event said 1 of 3
        files for a folder with two empty ones, trial)."""
        self._done += sum(1 for n in self.sizes.values() if n == 0)
        self._emit(True)

    def _emit(self, done: bool) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(min(self.carried + self.skipped + self.holes, self.total),
                                        self.total, self.rate(), self.file, self.transport, done,
                                        self._done, len(self.sizes), max(0, self.skipped)))

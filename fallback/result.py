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
    """

    ok: bool = False
    direction: str = ""
    transports: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    sent_bytes: int = 0
    skipped_bytes: int = 0
    seconds: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)
    skipped_files: dict[str, str] = field(default_factory=dict)  # path -> reason
    content: dict[str, str] = field(default_factory=dict)  # path -> plain|envelope|decrypted
    error: str | None = None
    verified: str = "full"  # "full" | "sampled": the weakest over the files in checksums
    verified_files: dict[str, str] = field(default_factory=dict)  # path -> level, below "full" only

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
            "seconds": round(self.seconds, 6),
            "rate_mbps": round(self.rate_mbps, 3),
            "checksums": dict(self.checksums),
            "error": self.error,
            "direction": self.direction,
            "skipped_files": dict(self.skipped_files),
            "content": dict(self.content),
            "verified": self.verified if self.ok else None,  # a failed run verified nothing as a whole
            "verified_files": dict(self.verified_files),
        }


ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Counts carried and skipped bytes and emits rate-limited events."""

    INTERVAL = 0.2
    WINDOW = 2.0

    def __init__(self, total: int, transport: str, callback: ProgressCallback | None) -> None:
        self.total = total
        self.transport = transport
        self.callback = callback
        self.carried = 0
        self.skipped = 0
        self.file = ""
        self._last_emit = 0.0
        self._samples: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def skip(self, n: int) -> None:
        self.skipped += n

    def unskip(self, n: int) -> None:
        """Take back bytes counted as already there that must be carried after all
        (a kept block failed re-verification at the receiver)."""
        self.skipped -= n

    def carry(self, n: int, file: str = "") -> None:
        self.carried += n
        if file:
            self.file = file
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
        self._emit(True)

    def _emit(self, done: bool) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(min(self.carried + self.skipped, self.total), self.total,
                                        self.rate(), self.file, self.transport, done))

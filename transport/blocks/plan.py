"""Deciding, per file, what a run must send: overwrite policy and resume check.

Pure functions over what the receiver reports (``TargetState``) and what the
source is, with ascp's meanings:

* overwrite ``never`` | ``always`` | ``diff`` (skip when size and digest match)
  | ``older`` (replace only a target older than the source);
* resume ``none`` (start over) | ``attrs`` (size and mtime unchanged)
  | ``sparse`` (attrs + a sample of block digests match) | ``full`` (attrs +
  every journaled block digest matches).

What a resume check compares is the journal's digests with the source's
current bytes. Whether the partial's *bytes* still match the journal is the
receiver's own check (``FileReceiver.verify_carried``), made in every mode.
A resumed file is verified ``full`` when every journaled block it keeps was
compared with the source this run, ``sampled`` when some were trusted on the
strength of size, mtime and a sample (``trusted_blocks``): the result of a
transfer says which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transport.blocks.manifest import FileEntry, rebasable_identity
from transport.errors import ProtocolError

RESUME_MODES = ("none", "attrs", "sparse", "full")
DEFAULT_RESUME = "full"
"""Every journaled block is compared with the source: the sender re-reads the
blocks the receiver kept, which is local disk work, cheap beside sending them,
and the result can say ``verified: full``."""
VERIFIED_LEVELS = ("full", "sampled")
"""A file's verification, strongest first: ``full`` (every block of the published
file was checked against the source's bytes this run), ``sampled`` (a resume
trusted journaled blocks it did not compare)."""
OVERWRITE_MODES = ("never", "always", "diff", "older")
SPARSE_SAMPLES = 16


@dataclass(frozen=True, slots=True)
class TargetState:
    """The receiver's view of one entry's target."""

    exists: bool = False
    is_dir: bool = False
    size: int = 0
    mtime_ns: int = 0
    journal: list[Any] | None = None  # source identity recorded by the partial's journal
    have: dict[int, bytes] = field(default_factory=dict)
    root: str | None = None  # digest of the existing target, when asked for (diff)

    def to_json(self) -> dict[str, Any]:
        return {
            "exists": self.exists,
            "is_dir": self.is_dir,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "journal": self.journal,
            "have": {str(i): d.hex() for i, d in self.have.items()},
            "root": self.root,
        }

    @classmethod
    def from_json(cls, d: Any) -> TargetState:
        try:
            return cls(
                exists=bool(d["exists"]),
                is_dir=bool(d["is_dir"]),
                size=int(d["size"]),
                mtime_ns=int(d["mtime_ns"]),
                journal=d.get("journal"),
                have={int(i): bytes.fromhex(h) for i, h in d["have"].items()},
                root=d.get("root"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"bad target state: {exc}") from None


def overwrite_action(entry: FileEntry, target: TargetState, mode: str) -> str:
    """``transfer``, ``skip`` or ``compare`` (diff: sizes equal, digests decide)."""
    if not target.exists or target.is_dir:
        return "transfer"
    if mode == "always":
        return "transfer"
    if mode == "never":
        return "skip"
    if mode == "older":
        return "transfer" if target.mtime_ns < entry.mtime_ns else "skip"
    if mode == "diff":
        return "compare" if target.size == entry.stored_size() else "transfer"
    raise ProtocolError(f"unknown overwrite policy {mode!r}")


def resume_samples(have: Iterable[int], mode: str) -> list[int]:
    """Which journaled blocks the sender must re-digest before trusting the partial."""
    held = sorted(have)
    if mode in ("none", "attrs") or not held:
        return []
    if mode == "full" or len(held) <= SPARSE_SAMPLES:
        return held
    # Evenly spread, always including the first and the last held block.
    step = (len(held) - 1) / (SPARSE_SAMPLES - 1)
    return sorted({held[round(k * step)] for k in range(SPARSE_SAMPLES)})


def trusted_blocks(have: Iterable[int], mode: str) -> set[int]:
    """Journaled blocks a resume in ``mode`` keeps without comparing them with the
    source: empty for ``full`` (and for partials of at most ``SPARSE_SAMPLES``
    blocks under ``sparse``), every journaled block for ``attrs``."""
    held = set(have)
    return held - set(resume_samples(held, mode)) if mode != "none" else set()


def batches(items: Iterable[int], size: int) -> list[list[int]]:
    """``items`` in lists of at most ``size`` (one control call each)."""
    out: list[list[int]] = []
    for i in items:
        if not out or len(out[-1]) >= size:
            out.append([])
        out[-1].append(i)
    return out


def to_ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as half-open ``(start, end)`` runs: compact on the wire."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def resumable(entry: FileEntry, target: TargetState) -> bool:
    """The partial was started from this very source (``attrs``: size, mtime, layout, header)."""
    return target.journal is not None and target.journal == entry.identity()


@dataclass(frozen=True, slots=True)
class ResumeCheck:
    """What a resume check must read: the source's digests of ``samples`` (block numbers).
    ``rebase``: the partial was started from this source before its mtime moved on
    (mode ``full`` only, ``manifest.rebasable_identity``): its blocks that still match
    are kept, the receiver opens it with ``FileReceiver(rebase=True)``."""

    samples: list[int]
    rebase: bool = False


@dataclass(frozen=True, slots=True)
class ResumeDecision:
    """``resume``: keep the partial, less ``stale`` (blocks whose source bytes changed
    since they were received, to be dropped by the receiver and sent again)."""

    resume: bool
    stale: list[int] = field(default_factory=list)
    rebase: bool = False


def resume_check(mode: str, entry: FileEntry, target: TargetState) -> ResumeCheck | None:
    """The samples to read for a resume of ``target`` in ``mode``; None: start over, with
    nothing to read (mode ``none``, no partial, or one of another source)."""
    if mode == "none" or target.journal is None:
        return None
    if resumable(entry, target):
        return ResumeCheck(resume_samples(target.have, mode))
    if mode == "full" and target.have and rebasable_identity(target.journal, entry.identity()):
        return ResumeCheck(resume_samples(target.have, mode), rebase=True)
    return None


def resume_decision(mode: str, check: ResumeCheck, target: TargetState,
                    fresh: dict[int, bytes]) -> ResumeDecision:
    """Given the source's digests ``fresh`` of ``check.samples``: in mode ``full`` every
    kept block was compared, so the ones that differ are dropped and the rest kept (a
    source changed in one block costs that block, as rsync's would); in ``attrs`` and
    ``sparse`` a sample that differs means changes anywhere: start over."""
    stale = [b for b in check.samples if fresh.get(b) != target.have.get(b)]
    if mode == "full":
        keep = not check.samples or len(stale) < len(check.samples)
        return ResumeDecision(keep, stale if keep else [], check.rebase and keep)
    return ResumeDecision(not stale)

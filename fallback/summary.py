"""The lines ``fallback transfer`` prints when it is done (without ``--json``).

Counts with plurals, sizes and rates in the progress bar's decimal units, what was skipped
and why, what was stored encrypted or removed; names from disk or the daemon are escaped
(``printable``), while ``--json`` keeps them exact.
"""

from __future__ import annotations

from fallback.progress import plural, printable, size
from fallback.result import TransferResult

SKIPPED_LISTED = 10
"""Skipped files named per reason in the summary; the rest are counted (``--json`` names
all). rsync says nothing of unchanged files; a list of thousands hid the lines that
mattered (trial: a re-sync of 5,000 unchanged files printed 5,000 lines)."""


def summary(result: TransferResult) -> list[str]:
    """The lines a finished transfer prints: counts with plurals, sizes and rate in MB and
    MB/s (decimal, as the progress bar); no rate when nothing moved."""
    if result.dry_run:
        lines = [f"dry run: {plural(len(result.would_transfer), 'file')} would be sent"
                 if result.direction == "upload" else
                 f"dry run: {plural(len(result.would_transfer), 'file')} would be fetched"]
        lines += [f"  {name}" for name in result.would_transfer]
        lines += [f"  not moved: {name} ({why})" for name, why in result.skipped_files.items()]
        return [printable(line) for line in lines]
    head = (f"{result.direction} ok: {plural(result.files, 'file')}, {size(result.bytes)}")
    if result.sent_bytes:
        rate = result.sent_bytes / result.seconds / 1e6 if result.seconds > 0 else 0.0
        holes = f", {size(result.hole_bytes)} in holes" if result.hole_bytes else ""
        moved = (f" ({size(result.sent_bytes)} sent, {size(result.skipped_bytes)} already "
                 f"there{holes}) in {result.seconds:.2f} s, {rate:.1f} MB/s over "
                 f"{','.join(result.transports)}")
    elif not result.bytes:  # empty files: nothing to send, nothing was "already there"
        moved = f", nothing to send ({result.seconds:.2f} s)"
    elif result.skipped_files and not result.checksums:
        # kept as they are (--overwrite never/older, refused): not known to be the same
        moved = f" not sent: see below ({result.seconds:.2f} s)"
    else:
        moved = f" already there, nothing sent ({result.seconds:.2f} s)"
    lines = [head + moved]
    by_reason: dict[str, list[str]] = {}
    for name, why in result.skipped_files.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():  # re-syncing 5,000 unchanged files printed 5,000 lines
        lines += [f"skipped {name}: {why}" for name in names[:SKIPPED_LISTED]]
        if len(names) > SKIPPED_LISTED:
            lines.append(f"skipped {len(names) - SKIPPED_LISTED} more: {why} "
                         "(--json lists every one)")
    for name, stored in result.stored_as.items():
        lines.append(f"stored {name} encrypted as {stored}")
    if result.stdio == "stdin":
        lines.append("standard input was spooled to a temporary file, sent and verified "
                     "against it")
    elif result.stdio == "stdout":
        lines.append("the file was verified in full before it was written to standard output")
    for name in result.removed:
        lines.append(f"removed source {name}")
    if result.verified != "full":
        n = len(result.verified_files)
        lines.append(f"verification sampled for {plural(n, 'file')}: the resume trusted blocks "
                     "kept from an earlier run without comparing them with the source "
                     "(--resume full compares every one)")
    return [printable(line) for line in lines]  # names escaped; --json keeps them exact

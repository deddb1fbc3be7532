"""The live progress bar on terminals (rich), silent elsewhere; sizes and plurals for the
summary.

One unit family throughout: sizes in decimal kB/MB/GB and rates in MB/s, in the bar and
in the summary (``--json`` keeps ``rate_mbps`` in Mbit/s). On a narrow terminal the bar
keeps its numbers and shortens the file name (the middle becomes ``…``).
"""

from __future__ import annotations

from typing import Any, TextIO

from fallback.result import ProgressEvent

NAME_MIN = 12
"""The shortest a file name is cut to before it is dropped from the bar."""
NUMBERS = 48
"""Columns the line's fields other than the bar, the file count, the kept bytes and the
name take at most: transport (5), sizes (``123.4/999.9 MB``, 14), rate (``123.4 MB/s``,
10), ``ETA`` and its time (3 + 7) and the 8 spaces between (47, rounded up)."""


def plural(n: int, word: str) -> str:
    """``1 file``, ``2 files``, ``0 files``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def size(n: float) -> str:
    """Bytes in decimal units, as the bar shows them: ``999 B``, ``1.5 kB``, ``4.2 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover - unreachable


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` columns, its middle replaced by ``…``."""
    if len(name) <= width:
        return name
    if width < 2:
        return name[-width:] if width > 0 else ""
    head = (width - 1) // 3
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


class ProgressPrinter:
    """A progress callback drawing transport, bar, bytes (those already there, resumed or
    unchanged, marked ``kept``), rate in MB/s,
    a labelled ETA, ``k/n files`` and the current file with rich."""

    def __init__(self, stream: TextIO) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._width, self._bar_width = 80, 10
        if not stream.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(file=stream)
        self._width = console.width
        self._bar_width = 40 if self._width >= 120 else 10
        self._bar = Progress(TextColumn("[bold]{task.fields[transport]}"),
                             BarColumn(bar_width=self._bar_width),
                             DownloadColumn(), TextColumn("{task.fields[resumed]}", markup=False),
                             TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             TextColumn("{task.fields[files]}", markup=False),
                             TextColumn("{task.fields[file]}", markup=False),  # a name is text
                             console=console, transient=False)
        self._bar.start()

    def __call__(self, ev: ProgressEvent) -> None:
        if self._bar is None:
            return
        fields = self.fields(ev)
        if ev.switch:  # one line above the bar at each change of transport
            self._bar.console.print(f"switched {_printable(ev.switch)}", markup=False,
                                    highlight=False)
        if self._task is None:
            self._task = self._bar.add_task("transfer", total=ev.bytes_total,
                                            completed=ev.bytes_done, **fields)
        # every event's total: one sent before the transfer counted its bytes (a switch
        # to UDP at the start) said 0, and the bar kept it ("4,194,304/0 bytes", trial)
        self._bar.update(self._task, total=ev.bytes_total, completed=ev.bytes_done, **fields)

    def fields(self, ev: ProgressEvent) -> dict[str, str]:
        """The text fields of one line for ``ev`` (what the bar shows beside its numbers)."""
        files = f"{ev.files_done}/{plural(ev.files_total, 'file')}" if ev.files_total > 1 else ""
        resumed = f"({size(ev.bytes_resumed)} kept)" if ev.bytes_resumed else ""
        room = self._width - NUMBERS - self._bar_width - len(files) - len(resumed)
        name = _printable(ev.file)
        return {"transport": ev.transport, "files": files, "resumed": resumed,
                "file": shorten(name, room) if room >= NAME_MIN else ""}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def printable(text: str) -> str:
    """Text for a terminal line: C0 and C1 control characters, DEL, the Unicode line and
    paragraph separators and undecodable bytes (surrogate escapes) written as Python
    escapes (``\\n``, ``\\x1b``, ``\\x85``, ``\\udcff``), so that a file name can neither
    break a line nor send escape codes to the terminal. A backslash stays as it is. JSON
    output keeps the exact names."""
    if not any(_unsafe(c) for c in text):
        return text
    return "".join(repr(c)[1:-1] if _unsafe(c) else c for c in text)


def _unsafe(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or o in (0x2028, 0x2029) or 0xD800 <= o <= 0xDFFF


_printable = printable

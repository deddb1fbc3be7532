"""The live progress bar on terminals (rich), silent elsewhere."""

from __future__ import annotations

from typing import Any, TextIO

from fallback.result import ProgressEvent


class ProgressPrinter:
    """A progress callback drawing bytes, rate, ETA and transport with rich."""

    def __init__(self, stream: TextIO) -> None:
        self._bar: Any = None
        self._task: Any = None
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

        self._bar = Progress(TextColumn("[bold]{task.fields[transport]}"), BarColumn(),
                             DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                             TextColumn("{task.fields[file]}", markup=False),  # a name is text
                             console=Console(file=stream), transient=False)
        self._bar.start()

    def __call__(self, ev: ProgressEvent) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("transfer", total=ev.bytes_total,
                                            transport=ev.transport, file="")
        self._bar.update(self._task, completed=ev.bytes_done, transport=ev.transport,
                         file=_printable(ev.file)[-40:])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _printable(name: str) -> str:
    """A file name for one terminal line: control characters and undecodable bytes escaped
    (``\\n``, ``\\udcff``), so a name cannot move the cursor or break the bar."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)

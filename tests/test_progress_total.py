"""The progress bar's total over UDP (trial: ``udp ━━━━ 4,194,304/0 bytes ? ETA 0:00:00``
with ``--transport udp`` both ways and on an ``auto`` upload, where HTTPS showed
``16.8/157.3 MB``). The switch to UDP came before the first event of the transfer and
its event said total 0; the bar kept the total of its first event."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fallback.engine import transfer
from fallback.progress import ProgressPrinter
from fallback.result import ProgressEvent
from tests.conftest import PASSWORDS, make_file

MB = 1 << 20


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_takes_the_total_of_a_later_event() -> None:
    bar = ProgressPrinter(Tty())
    bar(ProgressEvent(0, 0, 0.0, "", "udp", switch="https -> udp: --transport udp"))
    bar(ProgressEvent(4 * MB, 150 * MB, 8e6, "f.bin", "udp"))
    assert bar._bar is not None and bar._bar.tasks[0].total == 150 * MB
    bar.close()


@pytest.mark.parametrize("transport", ["udp", "auto"])
def test_udp_progress_events_carry_the_total_both_ways(daemon_factory, tmp_path: Path,
                                                       transport: str) -> None:
    d = daemon_factory(udp=True)
    size = 9 * MB
    src = make_file(tmp_path / "p.bin", size, seed=3)
    kw = dict(transport=transport, fingerprint=d.fingerprint, password=PASSWORDS["alice"],
              user="alice")
    events: list[ProgressEvent] = []
    res = transfer(str(src), d.url("/"), progress=events.append, **kw)
    assert "udp" in res.transports, res
    assert events and [ev.bytes_total for ev in events] == [size] * len(events), \
        [(ev.bytes_total, ev.switch) for ev in events]
    if transport == "auto":
        return
    events.clear()
    transfer(d.url("/p.bin"), str(tmp_path / "back.bin"), progress=events.append, **kw)
    assert events and [ev.bytes_total for ev in events] == [size] * len(events), \
        [(ev.bytes_total, ev.switch) for ev in events]

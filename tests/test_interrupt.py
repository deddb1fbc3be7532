"""Ctrl-C ends a blocking ``transfer()`` even when a cancellation is swallowed on the way
(fallback/client/interrupt.py). Before: a loaded run on Python 3.11 had Ctrl-C land in
``asyncio.wait_for`` as its future finished; the cancellation was lost, the upload went
on to the end and the CLI exited 0 (tests/test_cli_ux.py's Ctrl-C test)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from fallback.client.interrupt import run_interruptible

    async def stubborn():
        # swallows the first cancellation, as 3.11's wait_for can; ends on the next
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
        swallowed = False
        for _ in range(100):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
        return "finished"

    async def plain():
        return "done"

    t0 = time.monotonic()
    try:
        print(run_interruptible(stubborn))
    except KeyboardInterrupt:
        print("interrupted after %.1f s" % (time.monotonic() - t0))
    print(run_interruptible(plain))  # the handler is gone: a later run is untouched
    print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
""")


def test_a_swallowed_cancellation_still_ends_the_run_with_keyboardinterrupt() -> None:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    lines = p.stdout.split("\n")
    assert p.returncode == 0, p.stderr
    assert lines[0].startswith("interrupted after "), p.stdout  # not "finished"
    assert float(lines[0].split()[2]) < 5, p.stdout  # the second cancellation, ~1 s later
    assert lines[1:3] == ["done", "True"], p.stdout
    assert time.monotonic() - t0 < 30


def test_off_the_main_thread_it_is_a_plain_run() -> None:
    import threading

    from fallback.client.interrupt import run_interruptible

    async def work() -> int:
        return 7

    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(run_interruptible(work)))
    t.start()
    t.join(30)
    assert out == [7]


LOST = textwrap.dedent("""
    import asyncio, gc
    from fallback.client.interrupt import run_interruptible

    async def main():
        async def fails(exc):
            raise exc
        # tasks whose errors nobody retrieves, as aiohttp's body writer after a closed
        # connection (ConnectionResetError subclasses) and, for contrast, a bug
        for exc in (ConnectionResetError("Cannot write to closing transport"),
                    ValueError("a real bug")):
            t = asyncio.ensure_future(fails(exc))
            await asyncio.sleep(0.01)
            del t
            gc.collect()
        return "ok"

    print(run_interruptible(main))
""")


def test_a_lost_connections_unretrieved_error_is_not_printed_a_bug_still_is() -> None:
    """Before: "Task exception was never retrieved ... ClientConnectionResetError: Cannot
    write to closing transport" and its traceback on the stderr of a successful upload,
    with -q (trial, 1 run in 12)."""
    p = subprocess.run([sys.executable, "-c", LOST], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr
    assert "closing transport" not in p.stderr and "ConnectionResetError" not in p.stderr
    assert "a real bug" in p.stderr  # anything else still reaches the default handler

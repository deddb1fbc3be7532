"""Ctrl-C for the blocking ``transfer()``: it ends the transfer, even when a cancellation
is swallowed on the way.

``asyncio.run`` (and ``uvloop.run``) turn the first SIGINT into one cancellation of the
main task, and report ``KeyboardInterrupt`` only when that task ends cancelled. One
cancellation can be lost: Python 3.11's ``asyncio.wait_for`` returns its result instead
of raising when the awaited future finished in the same loop pass as the cancellation
(CPython gh-86296, fixed in 3.12). A loaded CI run saw that: Ctrl-C at 4 MB of a 268 MB
upload, the upload went on to the end and the CLI exited 0.

``run_interruptible`` keeps the interrupt as a fact rather than as one exception: the
first SIGINT cancels the task, and cancels it again every ``RECANCEL`` seconds while it
still runs (clean-up that takes longer is cut: the partial files stay, a re-run
resumes); a further SIGINT cancels it again at once. When the task ends after a
SIGINT, however it ended, ``KeyboardInterrupt`` is raised (``Terminated`` after a
SIGTERM, which the CLI handles the same way: ``handle_terminate``). Off the main thread (no
signal handlers there) it is a plain run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["RECANCEL", "Interrupted", "Terminated", "handle_terminate", "run_interruptible"]


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C ended the transfer. ``result``: what it had done by then (a
    ``TransferResult`` with ``ok`` false: direction, files and bytes planned, bytes sent,
    seconds, transports used, checksums of the files verified and published before the
    interrupt), set by ``fallback.client.session.transfer``; None elsewhere."""

    def __init__(self, result: Any = None) -> None:
        super().__init__()
        self.result = result


class Terminated(Interrupted):
    """A SIGTERM ended the transfer (``handle_terminate``): handled as Ctrl-C is (the
    session closed, partials kept), told apart by the CLI's exit code (143)."""


_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT,)


def handle_terminate() -> None:
    """SIGTERM too ends a transfer as Ctrl-C does: for the CLI, which owns its process
    (``timeout``, ``kill``, systemd stop). Before, a SIGTERM killed the client at once and
    its daemon session stayed open until it timed out, counting against
    ``sessions_per_user_max``: a cron job under ``timeout`` locked its user out (trial).
    Not for library callers of ``transfer()``: asyncio restores the default action, not
    an application's own handler, when the transfer ends."""
    global _SIGNALS
    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")

RECANCEL = 1.0
"""Seconds between two cancellations of a transfer that a SIGINT interrupted and that
still runs (a cancellation can be swallowed; see the module docstring)."""


def run_interruptible(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a new event loop (uvloop's when installed) until it completes.
    Returns its result or raises what it raised; ``KeyboardInterrupt`` when a SIGINT
    came while it ran."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_guarded(main))


async def _guarded(main: Callable[[], Awaitable[T]]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted: signal.Signals | None = None

    def recancel() -> None:
        if not task.done():
            task.cancel("interrupted")
            loop.call_later(RECANCEL, recancel)

    def on_signal(sig: signal.Signals) -> None:  # every Ctrl-C cancels again
        nonlocal interrupted
        interrupted = interrupted or sig
        recancel()

    loop.set_exception_handler(_quiet_lost_connections)
    installed: list[signal.Signals] = []
    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
            break
    try:
        result = await main()
    except asyncio.CancelledError:
        if interrupted:
            raise _interrupt(interrupted) from None
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    if interrupted:
        raise _interrupt(interrupted)
    return result


def _quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of errors nobody retrieved: a connection error of a request the
    transfer had given up on (aiohttp's ``ClientRequest.write_bytes`` task still writing a
    body into a connection that was closed: "Cannot write to closing transport") goes to
    the debug log, not as a traceback on a successful run's stderr (trial: 1 upload in 12,
    with ``-q``). Anything else goes to the default handler, as before."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError | OSError):
        logging.getLogger("fallback.client").debug("%s: %r", context.get("message"), exc)
        return
    loop.default_exception_handler(context)


def _interrupt(sig: signal.Signals) -> KeyboardInterrupt:
    return Terminated() if sig == signal.SIGTERM else Interrupted()

"""Warnings that may repeat thousands of times a second, logged once per kind per period.

Running out of descriptors, a connection flood, a limit being hit: each is worth one
line in the daemon's log, and the thousandth occurrence in the same minute is not
worth a thousand more (the log would then be the next resource to run out). A
``RateLimitedLog`` writes the first warning of a kind, drops the next ones for
``period`` seconds, and says how many it dropped when it writes that kind again.
"""

from __future__ import annotations

import logging
import threading
import time

PERIOD = 60.0
"""Seconds between two lines of the same kind."""


class RateLimitedLog:
    """One ``warning`` per ``kind`` per ``period`` seconds on ``logger``; thread-safe.

    Kinds are a small fixed vocabulary (an errno name, "connection-limit"), never a
    peer address: the table stays as small as that vocabulary.
    """

    def __init__(self, logger: logging.Logger, period: float = PERIOD) -> None:
        self.logger = logger
        self.period = period
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` was logged less than ``period`` ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        if dropped:
            msg += f" ({dropped} more like this since the last report)"
        self.logger.warning(msg, *args)
        return True

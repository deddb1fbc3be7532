"""Permission bits a receiver applies from the wire.

A sender states each file's and folder's mode (``FileEntry.mode``, within 0o7777).
A receiver never carries the setuid, setgid or sticky bits (0o7000): a daemon
running as root would otherwise create set-id programs owned by root for any user
who can upload, and a client would do the same from a hostile server.  It keeps the
permission bits 0o777 and applies its own process umask, as ``cp``, ``tar`` (as a
non-root user) and ``curl -T`` do.  A folder always keeps owner ``rwx`` so the
receiver can write into it and remove it.

The umask is read once, at import (from ``/proc/self/status`` where Linux has it,
otherwise by setting and restoring it before any thread of ours runs).
"""

from __future__ import annotations

import os

PERMISSION_BITS = 0o777
OWNER_RWX = 0o700


def _read_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & PERMISSION_BITS
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current & PERMISSION_BITS


UMASK = _read_umask()


def file_mode(wire: int) -> int:
    """The mode to give a received file whose sender stated *wire*: ``wire & 0o777``
    less the process umask (no setuid/setgid/sticky)."""
    return wire & PERMISSION_BITS & ~UMASK


def dir_mode(wire: int) -> int:
    """The mode to give a received folder: as ``file_mode``, plus owner ``rwx``."""
    return file_mode(wire) | OWNER_RWX

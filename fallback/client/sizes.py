"""Sizes as people write them (``4M``, ``64K``, ``2G``), for the CLI and the Python API."""

from __future__ import annotations

from fallback.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """``"4M"`` -> 4194304: binary units K, M, G, T (an optional ``B``/``iB`` after them),
    a bare number is bytes. Raises ``UsageError`` naming ``what`` for anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"{what}: bad size {text!r} (examples: 4096, 64K, 4M, 2G)") from None
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{what}: bad size {text!r} (examples: 4096, 64K, 4M, 2G)")
    return int(value * _UNITS[unit])

"""Passphrase -> key: Argon2id (RFC 9106) for encryption envelopes, and a cache of its output.

Argon2id is computed with argon2-cffi (the reference C implementation, which
releases the GIL and is safe to call from several threads at once), not with
``cryptography``: with cryptography 50.0.2, two threads deriving with
``lanes > 1`` at the same time raise a spurious ``MemoryError`` or never return
(``tests/test_envelope.py::test_concurrent_derivations_finish``), and a client
opens the files of a folder in a thread pool. Both compute Argon2id version
0x13 and give the same bytes for the same parameters; the committed v1 envelopes
in ``tests/data`` pin that.
"""

from __future__ import annotations

import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw

from transport.errors import ResourceExhausted, TransportError

__all__ = ["DEFAULT_KDF", "KdfParams", "MasterKeys", "argon2id", "passphrase_bytes"]

ARGON2_VERSION: Final = 0x13
"""Argon2 version 1.3 (decimal 19), the only one RFC 9106 specifies."""

KEY_SIZE: Final = 32

# Bounds on what a header may ask of the machine that opens it. A header comes
# from storage we do not trust; without these a forged one could make a client
# allocate terabytes or spin for hours before the key check can fail.
MAX_MEMORY_KIB: Final = 1 << 20  # 1 GiB
MAX_ITERATIONS: Final = 32
MAX_LANES: Final = 16


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters, stored in the header so they can be raised later
    without breaking old envelopes.

    The default (46 MiB, 2 passes, 1 lane) is the OWASP "m=47104, t=1" setting
    with the pass count doubled: about 90 ms on the development machine, once
    per transfer, which is negligible next to moving the data but makes each
    offline passphrase guess cost 46 MiB of memory and ~90 ms of a core.
    One lane keeps the cost the same on a single-core client.
    """

    memory_kib: int
    iterations: int
    lanes: int

    def __post_init__(self) -> None:
        if not 1 <= self.lanes <= MAX_LANES:
            raise ValueError(f"argon2 lanes {self.lanes} outside 1..{MAX_LANES}")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"argon2 iterations {self.iterations} outside 1..{MAX_ITERATIONS}")
        # Argon2 itself requires at least 8 KiB per lane (RFC 9106 section 3.1).
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            raise ValueError(
                f"argon2 memory {self.memory_kib} KiB outside {8 * self.lanes}..{MAX_MEMORY_KIB}"
            )


DEFAULT_KDF: Final = KdfParams(memory_kib=47104, iterations=2, lanes=1)


def passphrase_bytes(passphrase: str) -> bytes:
    """The passphrase as Argon2id input: NFC-normalised UTF-8, so the same passphrase
    typed on macOS (NFD input) and Linux gives the same key. ``ValueError`` if empty."""
    if not passphrase:
        raise ValueError("empty passphrase")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def argon2id(secret: bytes, salt: bytes, params: KdfParams) -> bytes:
    """32-byte Argon2id (v1.3) output for ``secret`` and ``salt`` (16 bytes here).

    Thread-safe and GIL-free while it runs. Raises ``ResourceExhausted`` (kind
    ``ENOMEM``) when the memory cannot be allocated, ``TransportError`` for any
    other failure of the C library.
    """
    try:
        return hash_secret_raw(
            secret,
            salt,
            time_cost=params.iterations,
            memory_cost=params.memory_kib,
            parallelism=params.lanes,
            hash_len=KEY_SIZE,
            type=Type.ID,
            version=ARGON2_VERSION,
        )
    except HashingError as exc:
        if "memory" in str(exc).lower():
            raise ResourceExhausted(
                f"argon2id: cannot allocate {params.memory_kib} KiB", resource="ENOMEM"
            ) from None
        raise TransportError(f"argon2id failed: {exc}") from None


class _Slot:
    __slots__ = ("key", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: bytes | None = None


class MasterKeys:
    """Argon2id outputs of one passphrase, derived at most once per (salt, params).

    ``get`` is thread-safe: callers asking for the same (salt, params) at once
    wait for the one derivation instead of each running their own; different
    salts derive in parallel. A failed derivation is not cached (the next call
    retries). At most ``capacity`` outputs are kept (least recently used
    dropped), so opening a folder of v1 envelopes, each with its own salt,
    holds bounded memory. The passphrase is held as NFC UTF-8 for the life of
    the object; ``repr`` hides it.
    """

    __slots__ = ("_capacity", "_lock", "_secret", "_slots", "derivations")

    def __init__(self, passphrase: str, capacity: int = 256) -> None:
        self._secret = passphrase_bytes(passphrase)
        self._capacity = capacity
        self._lock = threading.Lock()
        self._slots: OrderedDict[tuple[bytes, KdfParams], _Slot] = OrderedDict()
        self.derivations = 0
        """Argon2id runs so far (for tests and the per-transfer cost claim)."""

    def __repr__(self) -> str:
        return f"MasterKeys(<redacted>, {len(self._slots)} cached)"

    def get(self, salt: bytes, params: KdfParams) -> bytes:
        """Argon2id(passphrase, salt, params), from the cache when already derived."""
        k = (bytes(salt), params)
        with self._lock:
            slot = self._slots.get(k)
            if slot is None:
                slot = self._slots[k] = _Slot()
                while len(self._slots) > self._capacity:
                    self._slots.popitem(last=False)
            else:
                self._slots.move_to_end(k)
        with slot.lock:
            if slot.key is None:
                slot.key = argon2id(self._secret, k[0], params)
                with self._lock:
                    self.derivations += 1
            return slot.key

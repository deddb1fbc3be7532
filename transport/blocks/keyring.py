"""One passphrase, one Argon2id per transfer: envelope version 2 (issue 11 section 5).

Version 1 runs Argon2id (about 90 ms with the default parameters) for every
file, so a 10,000-file encrypted folder spent 15 minutes of CPU on key
derivation alone. ``EnvelopeKeyring`` derives one master key per transfer from
the passphrase and a per-transfer salt, and gives every file its own key from
``BLAKE3-derive_key(master || per-file salt)``. Each version 2 header carries
the per-transfer salt, the KDF parameters and its file salt, so any one file
still opens on its own with only the passphrase; a keyring opening a folder
caches the master per (salt, parameters) and so derives once per transfer that
wrote it, not once per file. Format and security argument: ``docs/envelope.md``.

Usage (one keyring per transfer, shared by all its worker threads)::

    ring = EnvelopeKeyring(passphrase)
    t = ring.for_upload(size, block_size)      # version 2 header, first call derives
    t = ring.open(entry.header)                # v1 or v2, derives once per salt
"""

from __future__ import annotations

import os

from transport.blocks.envelope import (
    SALT_SIZE,
    EnvelopeHeader,
    EnvelopeKey,
    EnvelopeTransform,
    seal_header,
)
from transport.blocks.kdf import DEFAULT_KDF, KdfParams, MasterKeys
from transport.blocks.layout import DEFAULT_BLOCK_SIZE

__all__ = ["EnvelopeKeyring"]

_KEY_CHECK_PLACEHOLDER = bytes(16)


class EnvelopeKeyring:
    """Envelope keys for one transfer under one passphrase; thread-safe.

    ``for_upload`` writes version 2 envelopes whose Argon2id salt is this
    keyring's (drawn at construction, ``os.urandom``); the one Argon2id run
    happens at the first ``for_upload`` (or ``open`` of an envelope with the same
    salt), never at construction. ``open`` reads version 1 and 2 headers and
    caches Argon2id outputs per (salt, KDF parameters), at most ``capacity`` of
    them. Concurrent callers needing the same derivation wait for one run.

    The passphrase (NFC UTF-8) and the cached master keys live as long as the
    keyring: drop it when the transfer ends. ``ValueError`` for an empty
    passphrase.
    """

    __slots__ = ("_kdf", "_masters", "_salt")

    def __init__(self, passphrase: str, kdf: KdfParams = DEFAULT_KDF, *,
                 capacity: int = 256) -> None:
        self._masters = MasterKeys(passphrase, capacity)
        self._kdf = kdf
        self._salt = os.urandom(SALT_SIZE)

    def __repr__(self) -> str:
        return f"EnvelopeKeyring(<redacted>, kdf={self._kdf}, derivations={self.derivations})"

    @property
    def derivations(self) -> int:
        """Argon2id runs so far: 1 for an upload of any number of files."""
        return self._masters.derivations

    @property
    def kdf(self) -> KdfParams:
        return self._kdf

    def for_upload(self, plain_size: int,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> EnvelopeTransform:
        """A version 2 transform with a fresh file salt, for encrypting ``plain_size`` bytes.

        Raises ``ValueError`` for sizes the layout refuses, and what Argon2id may
        raise on the first call (``ResourceExhausted`` when out of memory).
        """
        draft = EnvelopeHeader(
            version=2,
            kdf=self._kdf,
            salt=self._salt,
            block_size=block_size,
            plain_size=plain_size,
            key_check=_KEY_CHECK_PLACEHOLDER,
            file_salt=os.urandom(SALT_SIZE),
        )
        return EnvelopeTransform(*seal_header(draft, self._masters.get(self._salt, self._kdf)))

    def open(self, header_bytes: bytes | bytearray | memoryview) -> EnvelopeTransform:
        """The transform for an existing envelope (version 1 or 2) from its header.

        Errors as ``EnvelopeTransform.open``: ``ProtocolError`` / ``IntegrityError``
        for a header that is not one or is damaged (before any Argon2id run),
        ``BadPassphrase`` for a wrong passphrase or a header altered without it.
        """
        header = EnvelopeHeader.decode(header_bytes)
        master = self._masters.get(header.salt, header.kdf)
        return EnvelopeTransform(header, EnvelopeKey.from_master(master, header))


"""AES-256-GCM for whole blocks, through ``cryptography``'s ``AESGCM``.

This replaced a ``ctypes`` binding to the system libcrypto, written when
``AESGCM`` was measured to hold the GIL. Measured again for issue 10 with
``python -m bench.aead`` (2-core AMD EPYC shared with other jobs, load ~5.7;
cryptography 50.0.2 bundling OpenSSL 4.0.3, system OpenSSL 3.0.19; 4 MiB
blocks; MB/s of plaintext, median of 3 interleaved runs; a second full run
agreed within the noise):

==============================  ==========  ==========  ==========  ==========
back end                        encrypt x1  encrypt x2  decrypt x1  decrypt x2
==============================  ==========  ==========  ==========  ==========
ctypes (system libcrypto)             2674        2195        2196        2090
``AESGCM.encrypt``/``decrypt``        4760        4823        4616        4555
``AESGCM.encrypt_into``/``_into``     4990        5237        4965        5089
envelope encode, ctypes                999         774
envelope encode, ``AESGCM``           1634        1799
==============================  ==========  ==========  ==========  ==========

(x2 = two threads; it does not scale here because the two cores were busy with
other work. "Envelope encode" is ``EnvelopeTransform.encode``, BLAKE3 nonce
plus AES-GCM, the client's whole per-block cost.) With a pure-Python busy loop
on the main thread and two threads encrypting, the loop was blocked on the GIL
0.6 % of the time beside ctypes, 2.5 % beside ``encrypt`` and 1.1 % beside
``encrypt_into``, against 36 % beside a control that holds the GIL
(``bytes.count`` over 4 MiB; schedstat, see the bench). So ``AESGCM`` releases
the GIL while it works, as the binding did, and is 1.8-2.4x faster per block
and 1.6-2.3x faster end to end per envelope block: the binding goes.
``encrypt_into``/``decrypt_into`` (in the installed cryptography;
feature-detected, older releases use ``encrypt``/``decrypt``) also save
allocating and copying each block. Output is standard GCM (ciphertext then
16-byte tag, NIST SP 800-38D), byte-identical to the old binding: the committed
v1 envelopes in ``tests/data`` were written by it and re-encrypt identically.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from transport.errors import IntegrityError

__all__ = ["HAS_INTO", "KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "AesGcm"]

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16

HAS_INTO: Final = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
"""Whether the installed cryptography writes into caller buffers (saves a copy per block)."""

Buffer = bytes | bytearray | memoryview


class AesGcm:
    """AES-256-GCM with a 12-byte nonce and 16-byte tag; thread-safe (no per-call state).

    ``into=False`` forces the allocating ``encrypt``/``decrypt`` calls, which older
    cryptography releases only have (and which tests compare against).
    """

    __slots__ = ("_gcm", "_into")

    def __init__(self, key: bytes, *, into: bool = HAS_INTO) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._gcm = AESGCM(key)
        self._into = into and HAS_INTO

    def __repr__(self) -> str:
        return "AesGcm(<redacted>)"

    def encrypt_into(self, out: bytearray, offset: int, nonce: bytes, plain: Buffer,
                     aad: bytes) -> None:
        """Write ciphertext then tag of ``plain`` into ``out[offset : offset + len(plain) + 16]``.

        ``ValueError`` if ``out`` is too short or the nonce is not 12 bytes.
        """
        end = offset + len(plain) + TAG_SIZE
        if offset < 0 or end > len(out):
            raise ValueError(f"output buffer of {len(out)} bytes has no room for {end} bytes")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        if self._into:
            self._gcm.encrypt_into(nonce, plain, aad, memoryview(out)[offset:end])
        else:
            out[offset:end] = self._gcm.encrypt(nonce, bytes(plain), aad)

    def decrypt(self, nonce: Buffer, data: Buffer, aad: bytes) -> bytearray:
        """Plaintext of ``data`` (ciphertext then tag).

        Raises ``IntegrityError`` if the tag does not verify (tampered ciphertext,
        nonce, AAD or key) or ``data`` is shorter than a tag. No unauthenticated
        plaintext is ever returned.
        """
        n = len(data) - TAG_SIZE
        if n < 0:
            raise IntegrityError("AES-GCM: shorter than a tag")
        try:
            if self._into:
                out = bytearray(n)
                self._gcm.decrypt_into(bytes(nonce), data, aad, out)
                return out
            return bytearray(self._gcm.decrypt(bytes(nonce), bytes(data), aad))
        except InvalidTag:
            raise IntegrityError("AES-GCM: authentication failed") from None

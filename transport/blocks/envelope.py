"""Encryption at rest as a per-block transform (issue #6).

The client encrypts every block before it leaves; the daemon stores the
envelope (header + encrypted blocks) and never sees the passphrase or the
plaintext. Because the unit of encryption is the same block the data paths
move, resume, failover between HTTP and UDP, and per-block digests all keep
working on the stored form unchanged. The byte format and threat model are in
``docs/envelope.md``; the reasons for each choice are next to the code below.

Summary of the construction:

* Argon2id(passphrase, salt, params) -> 32-byte master key. In version 1 the
  salt is per file; in version 2 it is per transfer (``keyring.EnvelopeKeyring``
  derives it once for a whole folder) and each file's key is
  BLAKE3-derive_key(master || per-file salt).
* That key is split with BLAKE3 ``derive_key`` contexts into an AES-256-GCM
  key, a nonce key and a check key, so no key is ever used for two purposes.
* The header carries a key check: a BLAKE3 MAC (check key) over every header
  field before it. A wrong passphrase is therefore detected from the header
  alone, before any block is written, and the header cannot be altered
  (e.g. ``plain_size`` shrunk to truncate the file) without the passphrase.
* Block ``i`` is stored as ``nonce(12) || AES-GCM(plain, aad)``, with a
  synthetic nonce ``BLAKE3-keyed(nonce_key, i || BLAKE3(plain))[:12]`` and
  ``aad = BLAKE3(header) || i || len(plain) || last``.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Final

import blake3

from transport.blocks.aead import AesGcm
from transport.blocks.kdf import DEFAULT_KDF, KdfParams, argon2id, passphrase_bytes
from transport.blocks.layout import DEFAULT_BLOCK_SIZE, BlockLayout
from transport.errors import BadPassphrase, IntegrityError, ProtocolError, SourceChanged

__all__ = [
    "DEFAULT_KDF",
    "HEADER_SIZE",
    "HEADER_SIZES",
    "MAGIC",
    "MAX_HEADER_SIZE",
    "NONCE_SIZE",
    "OVERHEAD",
    "SUFFIX",
    "TAG_SIZE",
    "VERSION",
    "VERSIONS",
    "EnvelopeHeader",
    "EnvelopeKey",
    "EnvelopeTransform",
    "KdfParams",
    "decrypt_file",
    "encrypt_file",
    "is_envelope",
    "new_header",
    "seal_header",
]

MAGIC: Final = b"FBENV"
"""First bytes of every envelope, followed by a version byte."""

VERSION: Final = 1
"""The version ``new_header``, ``EnvelopeTransform.for_upload`` and ``encrypt_file`` write:
one Argon2id per file. ``keyring.EnvelopeKeyring`` writes version 2 (one per transfer)."""

VERSIONS: Final = (1, 2)
"""Every version this module reads."""

SUFFIX: Final = ".fallback-env"
"""Stored name = name + SUFFIX, so an envelope is recognisable without opening it
(the same convention as Aspera's ``.aspera-env``)."""

KDF_ARGON2ID: Final = 1
"""KDF identifier in the header: Argon2id, version 0x13 (RFC 9106)."""

NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
OVERHEAD: Final = NONCE_SIZE + TAG_SIZE
"""Bytes each stored block adds to its plaintext: the nonce travels with the block
so any single block can be decrypted on its own (range reads, resumed downloads)."""

SALT_SIZE: Final = 16
KEY_CHECK_SIZE: Final = 16
CHECKSUM_SIZE: Final = 16

# magic, version, kdf id, flags, memory_kib, iterations, lanes, salt, block_size, plain_size;
# version 2 inserts the per-file salt after the (per-transfer) Argon2id salt.
_FIELDS: Final = {1: struct.Struct(">5sBBBIII16sIQ"), 2: struct.Struct(">5sBBBIII16s16sIQ")}
HEADER_SIZES: Final = {v: f.size + KEY_CHECK_SIZE + CHECKSUM_SIZE for v, f in _FIELDS.items()}
"""Header length per version (80 and 96 bytes), fixed for each, so every block offset
is computable from the header alone, without an index."""
HEADER_SIZE: Final = HEADER_SIZES[1]
"""The version 1 header length, also the shortest: a file shorter is no envelope."""
MAX_HEADER_SIZE: Final = max(HEADER_SIZES.values())
"""Read this many bytes (or the whole file if shorter) to be sure to hold any header."""

# header digest, block index, plaintext length, last-block flag
_AAD: Final = struct.Struct(">32sQIB")
_INDEX: Final = struct.Struct(">Q")

# BLAKE3 derive_key contexts: globally unique, hard-coded, one per purpose.
_CTX_ENC: Final = "fallback envelope v1 2025 AES-256-GCM block key"
_CTX_NONCE: Final = "fallback envelope v1 2025 synthetic nonce key"
_CTX_CHECK: Final = "fallback envelope v1 2025 header key check"
_CTX_FILE: Final = "fallback envelope v2 2025 per-file key from transfer key and file salt"

# Hashing a large block on several threads roughly doubles BLAKE3 throughput
# here; below this size the thread hand-off costs more than it saves.
_PARALLEL_HASH_MIN: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """Everything needed to derive the key and lay out the blocks of one envelope.

    ``salt`` is the Argon2id salt: per file in version 1, per transfer in version 2,
    where ``file_salt`` (empty in version 1) makes each file's key its own.
    """

    version: int
    kdf: KdfParams
    salt: bytes
    block_size: int
    plain_size: int
    key_check: bytes
    file_salt: bytes = b""

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unsupported envelope version {self.version}")
        if len(self.salt) != SALT_SIZE:
            raise ValueError(f"salt must be {SALT_SIZE} bytes")
        if len(self.file_salt) != (SALT_SIZE if self.version >= 2 else 0):
            raise ValueError(f"file salt must be {SALT_SIZE} bytes in version 2, absent in 1")
        if len(self.key_check) != KEY_CHECK_SIZE:
            raise ValueError(f"key check must be {KEY_CHECK_SIZE} bytes")
        if not 0 <= self.plain_size < 1 << 64:
            raise ValueError(f"plain size {self.plain_size} out of range")
        # BlockLayout owns the block-size bounds; they also cap the memory a
        # reader must set aside for one block.
        BlockLayout(self.plain_size, self.block_size, self.size, OVERHEAD)

    @property
    def size(self) -> int:
        """Length of the encoded header: ``HEADER_SIZES[version]``."""
        return HEADER_SIZES[self.version]

    @property
    def layout(self) -> BlockLayout:
        """Where each stored block lives; shared with the data paths."""
        return BlockLayout(self.plain_size, self.block_size, self.size, OVERHEAD)

    def fields(self) -> bytes:
        """The header bytes before the key check: what the key check authenticates."""
        salts = (self.salt, self.file_salt) if self.version >= 2 else (self.salt,)
        return _FIELDS[self.version].pack(
            MAGIC,
            self.version,
            KDF_ARGON2ID,
            0,  # flags: reserved, must be zero
            self.kdf.memory_kib,
            self.kdf.iterations,
            self.kdf.lanes,
            *salts,
            self.block_size,
            self.plain_size,
        )

    def encode(self) -> bytes:
        """Exactly ``size`` bytes, ending in a checksum of all that precedes it.

        The checksum is unkeyed: it lets anyone (the daemon, ``fallback info``)
        tell a damaged header from a wrong passphrase. Authentication against
        deliberate changes is the key check's job.
        """
        body = self.fields() + self.key_check
        return body + blake3.blake3(body).digest(length=CHECKSUM_SIZE)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> EnvelopeHeader:
        """Parse the header at the start of ``data`` (anything after it is ignored).

        ``data`` needs the header's ``size`` bytes (80 or 96, by the version byte);
        passing ``MAX_HEADER_SIZE`` bytes, or the whole file if shorter, always works.
        Raises ``ProtocolError`` for something that is not an envelope, is too
        short for its version's header, or is a version we do not know (checked
        before the checksum, whose position a future version may move) and
        ``IntegrityError`` for a damaged header.
        """
        raw = bytes(memoryview(data)[:MAX_HEADER_SIZE])
        if len(raw) <= len(MAGIC) or not raw.startswith(MAGIC):
            raise ProtocolError("not a fallback envelope")
        version = raw[len(MAGIC)]
        if version not in VERSIONS:
            raise ProtocolError(f"unsupported envelope version {version}")
        size = HEADER_SIZES[version]
        if len(raw) < size:
            raise ProtocolError(
                f"not a fallback envelope: version {version} header needs {size} bytes,"
                f" got {len(raw)}"
            )
        raw = raw[:size]
        body, checksum = raw[:-CHECKSUM_SIZE], raw[-CHECKSUM_SIZE:]
        if not hmac.compare_digest(blake3.blake3(body).digest(length=CHECKSUM_SIZE), checksum):
            raise IntegrityError("envelope header: checksum mismatch (damaged header)")
        fields = _FIELDS[version]
        _, _, kdf_id, flags, memory_kib, iterations, lanes, *salts, block_size, plain_size = (
            fields.unpack_from(raw)
        )
        if kdf_id != KDF_ARGON2ID:
            raise ProtocolError(f"envelope header: unknown KDF {kdf_id}")
        if flags != 0:
            raise ProtocolError(f"envelope header: unsupported flags {flags:#04x}")
        try:
            return cls(
                version=version,
                kdf=KdfParams(memory_kib, iterations, lanes),
                salt=salts[0],
                block_size=block_size,
                plain_size=plain_size,
                key_check=raw[fields.size : fields.size + KEY_CHECK_SIZE],
                file_salt=salts[1] if version >= 2 else b"",
            )
        except ValueError as exc:
            raise ProtocolError(f"envelope header: {exc}") from None


def is_envelope(prefix: bytes | bytearray | memoryview) -> bool:
    """True if ``prefix`` (the first bytes of a file) starts with the envelope magic.

    Only the magic is checked: a file of an unknown version should still be
    routed to ``EnvelopeHeader.decode`` and fail there with a clear message,
    not be mistaken for plaintext.
    """
    return bytes(memoryview(prefix)[: len(MAGIC)]) == MAGIC


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class EnvelopeKey:
    """Key material derived from a passphrase for one header.

    Only derived keys are kept; the passphrase and the Argon2id output are
    dropped as soon as the subkeys exist. ``repr`` hides everything and equality
    is identity, so keys cannot leak into logs or be compared in variable time.
    """

    enc_key: bytes = field(repr=False)
    nonce_key: bytes = field(repr=False)
    check_key: bytes = field(repr=False)
    bound_fields: bytes = field(repr=False)
    """``EnvelopeHeader.fields()`` of the header this key was derived for."""

    def __repr__(self) -> str:
        return "EnvelopeKey(<redacted>)"

    @classmethod
    def derive(cls, passphrase: str, header: EnvelopeHeader) -> EnvelopeKey:
        """Argon2id(passphrase, salt, params) -> 32 bytes -> ``from_master``.

        The passphrase is NFC-normalised first so the same passphrase typed on
        macOS (NFD input) and Linux opens the same envelope. This derives every
        time; ``keyring.EnvelopeKeyring`` caches the Argon2id output instead.
        """
        return cls.from_master(
            argon2id(passphrase_bytes(passphrase), header.salt, header.kdf), header
        )

    @classmethod
    def from_master(cls, master: bytes, header: EnvelopeHeader) -> EnvelopeKey:
        """The three subkeys for ``header`` from its 32-byte Argon2id output ``master``.

        Version 1: subkeys straight from ``master``. Version 2: from the file key
        ``BLAKE3-derive_key(_CTX_FILE, master || file_salt)``, so every file of a
        transfer has its own keys although they share one ``master``.
        """
        if len(master) != 32:
            raise ValueError("master key must be 32 bytes")
        root = master
        if header.version >= 2:
            root = blake3.blake3(master + header.file_salt, derive_key_context=_CTX_FILE).digest()
        return cls(
            enc_key=blake3.blake3(root, derive_key_context=_CTX_ENC).digest(),
            nonce_key=blake3.blake3(root, derive_key_context=_CTX_NONCE).digest(),
            check_key=blake3.blake3(root, derive_key_context=_CTX_CHECK).digest(),
            bound_fields=header.fields(),
        )

    def check(self) -> bytes:
        """16-byte key-check value stored in the header.

        A MAC over the header fields rather than a bare key fingerprint: it
        detects a wrong passphrase and, with the same comparison, any change to
        the KDF parameters, salt, block size or plaintext size by someone
        without the passphrase. Without it an empty envelope (no blocks) could
        be substituted for a full one.
        """
        return blake3.blake3(self.bound_fields, key=self.check_key).digest(length=KEY_CHECK_SIZE)


def new_header(
    passphrase: str, plain_size: int, block_size: int, kdf: KdfParams = DEFAULT_KDF
) -> tuple[EnvelopeHeader, EnvelopeKey]:
    """A fresh header (random salt, hence fresh keys) and its key, for one upload.

    A new salt per envelope means two envelopes never share keys, so blocks
    cannot be moved between files even under the same passphrase.
    """
    draft = EnvelopeHeader(
        version=1,
        kdf=kdf,
        salt=os.urandom(SALT_SIZE),
        block_size=block_size,
        plain_size=plain_size,
        key_check=bytes(KEY_CHECK_SIZE),
    )
    return seal_header(draft, argon2id(passphrase_bytes(passphrase), draft.salt, kdf))


def seal_header(draft: EnvelopeHeader, master: bytes) -> tuple[EnvelopeHeader, EnvelopeKey]:
    """``draft`` with its key check filled in, and its key, from the Argon2id output
    ``master`` for ``draft.salt`` and ``draft.kdf``. The caller chose the salts."""
    key = EnvelopeKey.from_master(master, draft)  # key_check is not among the bound fields
    return replace(draft, key_check=key.check()), key


class EnvelopeTransform:
    """``BlockTransform`` that stores each block AES-256-GCM encrypted.

    Nonces are synthetic (derived from the key, the index and the plaintext)
    rather than random or counters: a resumed or retried transfer re-encrypts a
    block to the very same bytes, so a half-written block can be overwritten
    safely, and a nonce is never reused with different content — the failure
    that breaks GCM outright. The cost is that equal plaintext at the same index
    of the same file gives equal ciphertext, which reveals only that a block
    was rewritten unchanged.

    The AAD binds each block to this file (header digest, which includes the
    random salt), its position (index) and the file's end (length and a
    last-block flag), so blocks cannot be reordered, dropped, truncated or
    spliced in from another envelope without ``decode`` failing.

    Instances hold no mutable state and ``AesGcm`` is stateless per call, so one
    transform may be shared by threads encoding different blocks.
    """

    __slots__ = ("_aead", "_envelope", "_header", "_header_digest", "_key", "_layout")

    name = "envelope-v1"
    """The transform's name on the wire (manifests, journals) for every header version: it
    says "an FBENV envelope: header, then blocks of nonce || ciphertext || tag", which is
    all the daemon needs (the header's length gives the layout); which key schedule
    applies is the header's own version byte."""

    def __init__(self, header: EnvelopeHeader, key: EnvelopeKey) -> None:
        if key.bound_fields != header.fields() or not hmac.compare_digest(
            key.check(), header.key_check
        ):
            raise BadPassphrase("bad passphrase")
        self._envelope = header
        self._key = key
        self._header = header.encode()
        self._header_digest = blake3.blake3(self._header).digest()
        self._layout = header.layout
        self._aead = AesGcm(key.enc_key)

    def __repr__(self) -> str:
        h = self._envelope
        return f"EnvelopeTransform(plain_size={h.plain_size}, block_size={h.block_size})"

    @classmethod
    def for_upload(
        cls,
        passphrase: str,
        plain_size: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kdf: KdfParams = DEFAULT_KDF,
    ) -> EnvelopeTransform:
        """A transform with a fresh header, for encrypting ``plain_size`` bytes."""
        return cls(*new_header(passphrase, plain_size, block_size, kdf))

    @classmethod
    def open(
        cls, passphrase: str, header_bytes: bytes | bytearray | memoryview
    ) -> EnvelopeTransform:
        """The transform for an existing envelope, from its header (see ``EnvelopeHeader.decode``).

        A wrong passphrase (or a header altered without it) raises
        ``BadPassphrase`` here, before any block is fetched or written.
        """
        header = EnvelopeHeader.decode(header_bytes)
        return cls(header, EnvelopeKey.derive(passphrase, header))

    @property
    def header(self) -> bytes:
        return self._header

    @property
    def overhead(self) -> int:
        return OVERHEAD

    @property
    def envelope(self) -> EnvelopeHeader:
        """The parsed header (sizes, KDF parameters)."""
        return self._envelope

    @property
    def layout(self) -> BlockLayout:
        """Offsets of plaintext and stored blocks."""
        return self._layout

    def block_count(self) -> int:
        return self._layout.count

    def stored_size(self) -> int:
        """The header plus every stored block: the size of the whole envelope."""
        return self._layout.stored_size

    def _aad(self, index: int, plain_len: int) -> bytes:
        last = 1 if index == self._layout.count - 1 else 0
        return _AAD.pack(self._header_digest, index, plain_len, last)

    def _nonce(self, index: int, plain: bytes | bytearray | memoryview) -> bytes:
        threads = blake3.blake3.AUTO if len(plain) >= _PARALLEL_HASH_MIN else 1
        digest = blake3.blake3(plain, max_threads=threads).digest()
        return blake3.blake3(_INDEX.pack(index) + digest, key=self._key.nonce_key).digest(
            length=NONCE_SIZE
        )

    def encode(self, index: int, plain: bytes | bytearray | memoryview) -> bytearray:
        """``nonce || AES-GCM(plain, aad)`` for block ``index``; deterministic."""
        if not 0 <= index < self._layout.count:
            raise ValueError(f"block {index} outside 0..{self._layout.count - 1}")
        _, expected = self._layout.plain_range(index)
        if len(plain) != expected:
            raise ValueError(f"block {index}: {len(plain)} bytes, layout says {expected}")
        nonce = self._nonce(index, plain)
        out = bytearray(NONCE_SIZE + expected + TAG_SIZE)
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(out, NONCE_SIZE, nonce, plain, self._aad(index, expected))
        return out

    def decode(self, index: int, stored: bytes | bytearray | memoryview) -> bytearray:
        """Plaintext of block ``index``; ``IntegrityError`` naming the block on any tampering."""
        if not 0 <= index < self._layout.count:
            raise ProtocolError(f"block {index} outside 0..{self._layout.count - 1}")
        _, plain_len = self._layout.plain_range(index)
        view = memoryview(stored)
        if len(view) != plain_len + OVERHEAD:
            raise IntegrityError(
                f"block {index}: stored length {len(view)}, layout says {plain_len + OVERHEAD}"
            )
        try:
            return self._aead.decrypt(
                view[:NONCE_SIZE], view[NONCE_SIZE:], self._aad(index, plain_len)
            )
        except IntegrityError:
            raise IntegrityError(f"block {index}: authentication failed") from None


# --------------------------------------------------------------------------
# Whole-file helpers for ``fallback encrypt`` / ``fallback decrypt`` (no daemon).


def _partial_path(dst: Path) -> Path:
    """Hidden temp file beside ``dst``: same file system, so ``os.replace`` is atomic."""
    return dst.with_name(f".{dst.name}.fallback-partial")


def _read_full(f: io.FileIO, view: memoryview) -> int:
    """Fill ``view`` unless EOF comes first; short reads before EOF are retried so
    block boundaries stay fixed (pipes, network file systems)."""
    n = 0
    while n < len(view):
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; not possible (nor needed) on every platform."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _AtomicOutput:
    """Write to ``.{name}.fallback-partial``, then fsync and rename onto ``dst``.

    On any exception (including KeyboardInterrupt) the partial file is removed,
    so ``dst`` either gets the complete, verified output or is left untouched.
    """

    __slots__ = ("dst", "file", "tmp")

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.tmp = _partial_path(dst)
        self.file: BinaryIO = open(self.tmp, "wb")  # closed by commit() or abort()

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.dst)
        _fsync_dir(self.dst.parent)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def encrypt_file(
    src: Path,
    dst: Path,
    passphrase: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    kdf: KdfParams = DEFAULT_KDF,
) -> None:
    """Encrypt ``src`` into the envelope ``dst``, one block in memory at a time.

    Raises ``SourceChanged`` if ``src`` changes size while being read, since the
    header already committed to its size.
    """
    src, dst = Path(src), Path(dst)
    with open(src, "rb", buffering=0) as f:
        plain_size = os.fstat(f.fileno()).st_size
        transform = EnvelopeTransform.for_upload(passphrase, plain_size, block_size, kdf)
        layout = transform.layout
        buf = bytearray(block_size)
        view = memoryview(buf)
        out = _AtomicOutput(dst)
        try:
            out.file.write(transform.header)
            for index in range(layout.count):
                _, length = layout.plain_range(index)
                if _read_full(f, view[:length]) != length:
                    raise SourceChanged(f"{src}: shrank while being encrypted")
                out.file.write(transform.encode(index, view[:length]))
            if f.read(1):
                raise SourceChanged(f"{src}: grew while being encrypted")
            out.commit()
        except BaseException:
            out.abort()
            raise


def decrypt_file(src: Path, dst: Path, passphrase: str) -> None:
    """Decrypt the envelope ``src`` into ``dst``, verifying every block.

    The passphrase and the file's length are checked before any output file
    exists; a block that fails authentication aborts with ``IntegrityError``
    naming it and removes the partial output, so unauthenticated plaintext is
    never left under ``dst``.
    """
    src, dst = Path(src), Path(dst)
    with open(src, "rb", buffering=0) as f:
        head = bytearray(MAX_HEADER_SIZE)
        got = _read_full(f, memoryview(head))
        transform = EnvelopeTransform.open(passphrase, memoryview(head)[:got])
        layout = transform.layout
        f.seek(layout.header_len)
        actual = os.fstat(f.fileno()).st_size
        expected = layout.stored_size
        if actual < expected:
            index = (actual - layout.header_len) // layout.max_stored_block
            raise IntegrityError(
                f"block {index}: truncated (envelope is {actual} bytes, layout says {expected})"
            )
        if actual > expected:
            raise IntegrityError(
                f"{actual - expected} bytes of trailing data after the last block"
                f" (envelope is {actual} bytes, layout says {expected})"
            )
        buf = bytearray(layout.max_stored_block)
        view = memoryview(buf)
        out = _AtomicOutput(dst)
        try:
            for index in range(layout.count):
                _, length = layout.stored_range(index)
                n = _read_full(f, view[:length])
                out.file.write(transform.decode(index, view[:n]))
            if f.read(1):
                raise IntegrityError("trailing data after the last block")
            out.commit()
        except BaseException:
            out.abort()
            raise

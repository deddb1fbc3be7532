"""Encryption at rest (#6): envelope format, per-block transform and file helpers."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import blake3
import pytest

from tests.conftest import Daemon
from transport.blocks.envelope import (
    DEFAULT_KDF,
    HEADER_SIZE,
    HEADER_SIZES,
    MAGIC,
    MAX_HEADER_SIZE,
    NONCE_SIZE,
    OVERHEAD,
    SUFFIX,
    VERSION,
    VERSIONS,
    EnvelopeHeader,
    EnvelopeKey,
    EnvelopeTransform,
    KdfParams,
    decrypt_file,
    encrypt_file,
    is_envelope,
    new_header,
)
from transport.blocks.keyring import EnvelopeKeyring
from transport.blocks.transform import BlockTransform
from transport.errors import BadPassphrase, IntegrityError, ProtocolError, SourceChanged

B = 4096
CHEAP = KdfParams(memory_kib=64, iterations=1, lanes=1)
PW = "correct horse battery staple"


def make(size: int, block_size: int = B, passphrase: str = PW) -> EnvelopeTransform:
    return EnvelopeTransform.for_upload(passphrase, size, block_size, CHEAP)


def plaintext(size: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


def seal(t: EnvelopeTransform, data: bytes) -> bytes:
    """The whole stored object, built in memory (tests only use small files)."""
    parts = [t.header]
    for i in range(t.block_count()):
        off, length = t.layout.plain_range(i)
        parts.append(t.encode(i, data[off : off + length]))
    return b"".join(parts)


def blocks(t: EnvelopeTransform, stored: bytes) -> list[bytes]:
    out = []
    for i in range(t.block_count()):
        off, length = t.layout.stored_range(i)
        out.append(stored[off : off + length])
    return out


def unseal(passphrase: str, stored: bytes) -> bytes:
    t = EnvelopeTransform.open(passphrase, stored[:HEADER_SIZE])
    return b"".join(t.decode(i, s) for i, s in enumerate(blocks(t, stored)))


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def reseal_header(raw: bytes, **changes: int) -> bytes:
    """Rewrite header fields and recompute the (unkeyed) checksum: a deliberate forgery."""
    names = ["magic", "version", "kdf", "flags", "memory", "iterations", "lanes", "salt"]
    names += ["block_size", "plain_size"]
    fmt = struct.Struct(">5sBBBIII16sIQ")
    values = dict(zip(names, fmt.unpack_from(raw), strict=True))
    values.update(changes)
    body = fmt.pack(*(values[n] for n in names)) + raw[fmt.size : HEADER_SIZE - 16]
    return body + blake3.blake3(body).digest(length=16)


# --- format constants -------------------------------------------------------


def test_constants_and_header_shape() -> None:
    assert OVERHEAD == 28
    assert HEADER_SIZE == 80
    assert SUFFIX == ".fallback-env"
    t = make(10)
    assert isinstance(t.header, bytes) and len(t.header) == HEADER_SIZE
    assert t.header.startswith(MAGIC) and t.header[len(MAGIC)] == VERSION
    assert t.name == "envelope-v1" and t.overhead == OVERHEAD
    assert is_envelope(t.header) and is_envelope(t.header[:5])
    assert not is_envelope(b"FBEN") and not is_envelope(b"hello world")
    proto: BlockTransform = t  # structural check for mypy; runtime smoke below
    assert proto.decode(0, proto.encode(0, b"0123456789")) == b"0123456789"


def test_header_encode_decode_roundtrip() -> None:
    header, _ = new_header(PW, 123456, B, CHEAP)
    raw = header.encode()
    assert len(raw) == HEADER_SIZE
    assert EnvelopeHeader.decode(raw) == header
    assert EnvelopeHeader.decode(raw + b"trailing block bytes") == header
    assert EnvelopeHeader.decode(memoryview(raw)) == header
    assert header.kdf == CHEAP and len(header.salt) == 16 and len(header.key_check) == 16


def test_fresh_salt_per_envelope() -> None:
    a, _ = new_header(PW, 10, B, CHEAP)
    b, _ = new_header(PW, 10, B, CHEAP)
    assert a.salt != b.salt and a.key_check != b.key_check


# --- roundtrip and layout -----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, 3 * B + 7])
def test_roundtrip_and_layout(size: int) -> None:
    data = plaintext(size)
    t = make(size)
    stored = seal(t, data)
    assert t.block_count() == -(-size // B)
    assert len(stored) == t.stored_size() == HEADER_SIZE + size + t.block_count() * OVERHEAD
    for i in range(t.block_count()):
        plain_len = min(B, size - i * B)
        assert t.layout.stored_range(i) == (
            len(t.header) + i * (B + OVERHEAD),
            plain_len + OVERHEAD,
        )
    assert unseal(PW, stored) == data


def test_roundtrip_with_default_kdf() -> None:
    data = plaintext(2 * B + 5, seed=7)
    t = EnvelopeTransform.for_upload(PW, len(data), B)
    assert t.envelope.kdf == DEFAULT_KDF
    assert unseal(PW, seal(t, data)) == data
    with pytest.raises(BadPassphrase):
        EnvelopeTransform.open("not it", t.header)


def test_decode_accepts_memoryview_and_bytearray() -> None:
    t = make(B + 3)
    data = plaintext(B + 3)
    s0 = t.encode(0, memoryview(bytearray(data))[:B])
    assert t.decode(0, memoryview(bytearray(s0))) == data[:B]


def test_unicode_passphrase_normalised() -> None:
    composed = "pässwörd"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    stored = seal(make(100, passphrase=composed), plaintext(100))
    assert unseal(decomposed, stored) == plaintext(100)


# --- determinism and nonces -------------------------------------------------------


def test_encode_is_deterministic() -> None:
    data = plaintext(3 * B + 7)
    t = make(len(data))
    first = seal(t, data)
    assert seal(t, data) == first
    # A resumed transfer reopens the header: it must re-encrypt identically.
    again = EnvelopeTransform.open(PW, t.header)
    assert seal(again, data) == first


def test_nonce_depends_on_content_and_index() -> None:
    t = make(3 * B)
    a, b = plaintext(B, seed=1), plaintext(B, seed=2)
    assert t.encode(0, a)[:12] != t.encode(0, b)[:12]
    assert t.encode(0, a)[:12] != t.encode(1, a)[:12]
    assert t.encode(0, a) != t.encode(1, a)


def test_same_content_different_file_differs() -> None:
    data = plaintext(B)
    assert seal(make(B), data)[HEADER_SIZE:] != seal(make(B), data)[HEADER_SIZE:]


def test_no_plaintext_run_in_stored_bytes() -> None:
    pattern = b"ABCDEFGHIJKLMNOP" * 4 + bytes(64) + b"\xff" * 64
    data = (pattern * (3 * B // len(pattern) + 1))[: 3 * B + 7]
    windows = {data[i : i + 16] for i in range(len(data) - 15)}
    stored = seal(make(len(data)), data)
    assert not any(stored[i : i + 16] in windows for i in range(len(stored) - 15))


# --- passphrase and header ------------------------------------------------------


def test_wrong_passphrase_detected_by_open() -> None:
    t = make(3 * B)
    with pytest.raises(BadPassphrase, match="bad passphrase"):
        EnvelopeTransform.open("Correct horse battery staple", t.header)
    assert issubclass(BadPassphrase, IntegrityError)


def test_key_for_other_header_rejected() -> None:
    h1, k1 = new_header(PW, 10, B, CHEAP)
    h2, _ = new_header(PW, 10, B, CHEAP)
    wrong = EnvelopeKey.derive("nope", h1)
    with pytest.raises(BadPassphrase):
        EnvelopeTransform(h1, wrong)
    with pytest.raises(BadPassphrase):
        EnvelopeTransform(h2, k1)


def test_key_repr_redacted() -> None:
    header, key = new_header(PW, 10, B, CHEAP)
    assert "redacted" in repr(key)
    assert key.enc_key.hex() not in repr(key)
    assert PW not in repr(EnvelopeTransform(header, key))


def test_every_header_bit_flip_is_detected() -> None:
    raw = make(3 * B + 7).header
    for pos in range(HEADER_SIZE):
        for bit in range(8):
            with pytest.raises((IntegrityError, ProtocolError)):
                EnvelopeHeader.decode(flip(raw, pos, bit))


def test_checksum_failure_is_integrity_error() -> None:
    raw = make(10).header
    with pytest.raises(IntegrityError, match="checksum"):
        EnvelopeHeader.decode(flip(raw, 45))  # inside plain_size
    with pytest.raises(IntegrityError):
        EnvelopeTransform.open(PW, flip(raw, 30))  # inside the salt


def test_not_an_envelope_and_unknown_version() -> None:
    raw = make(10).header
    for bad in (b"", raw[:-1], b"XXXXX" + raw[5:], b"plain text file" * 10):
        with pytest.raises(ProtocolError, match="not a fallback envelope"):
            EnvelopeHeader.decode(bad)
    for version in (0, 3, 255):
        future = raw[:5] + bytes([version]) + raw[6:]
        with pytest.raises(ProtocolError, match=f"unsupported envelope version {version}$"):
            EnvelopeHeader.decode(future)


def test_forged_header_fails_key_check() -> None:
    """Re-checksummed edits (e.g. shrinking plain_size to truncate) need the passphrase."""
    t = make(3 * B + 7)
    for change in ({"plain_size": 0}, {"plain_size": 2 * B}, {"block_size": 2 * B}):
        forged = reseal_header(t.header, **change)
        EnvelopeHeader.decode(forged)  # well-formed ...
        with pytest.raises(BadPassphrase):  # ... but not authentic
            EnvelopeTransform.open(PW, forged)


def test_hostile_kdf_params_rejected_before_kdf_runs() -> None:
    raw = make(10).header
    for change in ({"memory": 0xFFFFFFFF}, {"iterations": 10**6}, {"lanes": 0}, {"kdf": 9}):
        with pytest.raises(ProtocolError):
            EnvelopeHeader.decode(reseal_header(raw, **change))


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        KdfParams(memory_kib=4, iterations=1, lanes=1)
    with pytest.raises(ValueError):
        new_header(PW, 10, 100, CHEAP)  # block size below the layout minimum
    with pytest.raises(ValueError):
        new_header("", 10, B, CHEAP)
    t = make(B + 1)
    with pytest.raises(ValueError):
        t.encode(0, b"short")
    with pytest.raises(ValueError):
        t.encode(2, b"x")
    with pytest.raises(ProtocolError):
        t.decode(2, bytes(OVERHEAD + 1))


# --- tampering with blocks ------------------------------------------------------


def test_bit_flip_in_block_names_the_block() -> None:
    data = plaintext(3 * B + 7)
    t = make(len(data))
    stored = blocks(t, seal(t, data))
    for i, block in enumerate(stored):
        positions = range(len(block)) if i == 0 else [0, 11, 12, len(block) // 2, len(block) - 1]
        for pos in positions:
            with pytest.raises(IntegrityError, match=f"^block {i}: authentication failed$"):
                t.decode(i, flip(block, pos, pos % 8))


def test_swapped_blocks_rejected() -> None:
    data = plaintext(3 * B, seed=3)
    t = make(len(data))
    s = blocks(t, seal(t, data))
    with pytest.raises(IntegrityError, match="block 0"):
        t.decode(0, s[1])
    with pytest.raises(IntegrityError, match="block 1"):
        t.decode(1, s[0])


def test_truncated_last_block_rejected() -> None:
    data = plaintext(3 * B + 7)
    t = make(len(data))
    last = blocks(t, seal(t, data))[-1]
    with pytest.raises(IntegrityError, match="block 3: stored length"):
        t.decode(3, last[:-1])
    with pytest.raises(IntegrityError, match="block 3"):
        t.decode(3, last + b"\0")


def test_aad_binds_blocks_to_header_even_with_shared_keys() -> None:
    """Two headers with the same salt and passphrase share keys; the AAD still separates them.

    A full non-last block of a 2-block file must not pass as the (last) block
    of a 1-block file, nor at its own index of a file with another size.
    """
    long_header, long_key = new_header(PW, 2 * B, B, CHEAP)
    draft = replace(long_header, plain_size=B, key_check=bytes(16))
    short_key = EnvelopeKey.derive(PW, draft)
    assert short_key.enc_key == long_key.enc_key  # same salt and params: same keys
    short = EnvelopeTransform(replace(draft, key_check=short_key.check()), short_key)
    long = EnvelopeTransform(long_header, long_key)
    data = plaintext(2 * B)
    s = blocks(long, seal(long, data))
    with pytest.raises(IntegrityError, match="block 0: authentication failed"):
        short.decode(0, s[0])
    assert short.decode(0, short.encode(0, data[:B])) == data[:B]
    # Same index, same length, neither block last: only the header digest differs.
    draft = replace(long_header, plain_size=2 * B + 1, key_check=bytes(16))
    other_key = EnvelopeKey.derive(PW, draft)
    other = EnvelopeTransform(replace(draft, key_check=other_key.check()), other_key)
    with pytest.raises(IntegrityError, match="block 0: authentication failed"):
        other.decode(0, s[0])


def test_block_from_other_file_rejected() -> None:
    data = plaintext(2 * B, seed=4)
    a, b = make(len(data)), make(len(data))
    sa, sb = blocks(a, seal(a, data)), blocks(b, seal(b, data))
    with pytest.raises(IntegrityError, match="block 1: authentication failed"):
        a.decode(1, sb[1])
    with pytest.raises(IntegrityError, match="block 0"):
        b.decode(0, sa[0])


# --- file helpers ---------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "fallback-partial" in p.name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("size", [0, 1, B, 5 * B + 123])
def test_encrypt_decrypt_file_roundtrip(tmp_path: Path, size: int) -> None:
    src, env, out = tmp_path / "in.bin", tmp_path / ("in.bin" + SUFFIX), tmp_path / "out.bin"
    src.write_bytes(os.urandom(size))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    raw = env.read_bytes()
    assert is_envelope(raw)
    t = EnvelopeTransform.open(PW, raw[:HEADER_SIZE])
    assert len(raw) == t.stored_size()
    decrypt_file(env, out, PW)
    assert sha256(out) == sha256(src)
    assert leftovers(tmp_path) == []


def test_decrypt_file_wrong_passphrase_leaves_nothing(tmp_path: Path) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(3 * B))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    with pytest.raises(BadPassphrase):
        decrypt_file(env, out, "wrong")
    assert not out.exists() and leftovers(tmp_path) == []


def test_decrypt_file_tampered_block_leaves_nothing(tmp_path: Path) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(3 * B + 7))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    raw = env.read_bytes()
    env.write_bytes(flip(raw, HEADER_SIZE + 2 * (B + OVERHEAD) + 100))
    with pytest.raises(IntegrityError, match="^block 2: authentication failed$"):
        decrypt_file(env, out, PW)
    assert not out.exists() and leftovers(tmp_path) == []


def test_decrypt_file_failure_keeps_existing_dst(tmp_path: Path) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(2 * B))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    env.write_bytes(flip(env.read_bytes(), env.stat().st_size - 1))
    out.write_bytes(b"previous contents")
    with pytest.raises(IntegrityError, match="block 1"):
        decrypt_file(env, out, PW)
    assert out.read_bytes() == b"previous contents" and leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", [1, OVERHEAD, B + OVERHEAD, B + OVERHEAD + 7])
def test_decrypt_file_truncated(tmp_path: Path, cut: int) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(3 * B + 7))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    raw = env.read_bytes()
    env.write_bytes(raw[:-cut])
    with pytest.raises(IntegrityError, match=r"^block \d: truncated"):
        decrypt_file(env, out, PW)
    assert not out.exists() and leftovers(tmp_path) == []


def test_decrypt_file_trailing_data(tmp_path: Path) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(B + 1))
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    with env.open("ab") as f:
        f.write(b"extra")
    with pytest.raises(IntegrityError, match="trailing"):
        decrypt_file(env, out, PW)
    assert not out.exists() and leftovers(tmp_path) == []


def test_decrypt_file_not_an_envelope(tmp_path: Path) -> None:
    src, out = tmp_path / "plain.txt", tmp_path / "out"
    src.write_bytes(b"just some text\n" * 100)
    with pytest.raises(ProtocolError, match="not a fallback envelope"):
        decrypt_file(src, out, PW)
    assert not out.exists() and leftovers(tmp_path) == []


def test_encrypt_file_replaces_stale_partial(tmp_path: Path) -> None:
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    src.write_bytes(plaintext(B + 9))
    (tmp_path / ".a.env.fallback-partial").write_bytes(b"left by a crash")
    encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    decrypt_file(env, out, PW)
    assert out.read_bytes() == src.read_bytes() and leftovers(tmp_path) == []


@pytest.mark.parametrize("claimed", [3 * B, B])
def test_encrypt_file_source_changed_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int
) -> None:
    """The header commits to the size seen at the start; a change aborts cleanly."""
    src, env = tmp_path / "a", tmp_path / "a.env"
    src.write_bytes(plaintext(2 * B))

    class Stat:
        st_size = claimed

    monkeypatch.setattr(os, "fstat", lambda fd: Stat())
    with pytest.raises(SourceChanged):
        encrypt_file(src, env, PW, block_size=B, kdf=CHEAP)
    assert not env.exists() and leftovers(tmp_path) == []


def test_file_helpers_memory_bounded_by_a_block(tmp_path: Path) -> None:
    block = 64 << 10
    src, env, out = tmp_path / "a", tmp_path / "a.env", tmp_path / "b"
    with src.open("wb") as f:
        for _ in range(64):  # 4 MiB file, 64 blocks
            f.write(os.urandom(block))
    steps: list[Callable[[], None]] = [
        lambda: encrypt_file(src, env, PW, block_size=block, kdf=CHEAP),
        lambda: decrypt_file(env, out, PW),
    ]
    for step in steps:
        tracemalloc.start()
        try:
            step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 6 * block, peak
    assert sha256(out) == sha256(src)


# --- key derivation: concurrency and compatibility (issue 10) ---------------------

DATA = Path(__file__).parent / "data"
# Envelopes written by the first implementation (cryptography's Argon2id), committed
# so every later KDF back end must open them and reproduce them byte for byte.
# name: (KDF params, plaintext size, Argon2id output for PW and the file's salt)
V1_FIXTURES = {
    "v1-cheap": (
        KdfParams(64, 1, 1),
        2 * B + 7,
        "b906964338ee80c2fa137af8fbc648bb030aba03980558fd9d459c37dd6a949e",
    ),
    "v1-lanes4": (
        KdfParams(256, 2, 4),
        100,
        "4a00d468008608554fee9dcd7e5d5cc934968aaef608b31e5d4282d5ed5e95fe",
    ),
    "v1-default": (
        DEFAULT_KDF,
        10,
        "2cef54cbad8b374085c391ba6b7083d10f51ea5ae9aac0faf5aaadaafdf2c87e",
    ),
}

_CONCURRENT_DERIVE = """
import sys, threading
from pathlib import Path
from transport.blocks.envelope import EnvelopeTransform, KdfParams
pw, threads = sys.argv[1], int(sys.argv[2])
headers = [Path(p).read_bytes()[:80] for p in sys.argv[3:]]
results, errors = [], []
def open_all(k):
    try:
        for h in headers:
            EnvelopeTransform.open(pw, h)
        t = EnvelopeTransform.for_upload(pw, 10, 4096, KdfParams(47104, 2, 4))
        results.append(EnvelopeTransform.open(pw, t.header).envelope.kdf.lanes)
    except BaseException as exc:
        errors.append(repr(exc))
ts = [threading.Thread(target=open_all, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(sorted(results), errors)
"""


@pytest.mark.parametrize("threads", [2, 4])
def test_concurrent_derivations_finish(threads: int) -> None:
    """Several threads deriving multi-lane keys at once (a client opening the files of a
    folder in its thread pool) all finish with the right keys. cryptography 50.0.2's
    Argon2id deadlocks here (or fails with a spurious MemoryError) for lanes > 1. Run in
    a child process: a thread stuck in C cannot be stopped, a process can be killed."""
    paths = [str(DATA / f"{name}.fallback-env") for name in ("v1-lanes4", "v1-cheap")]
    cmd = [sys.executable, "-c", _CONCURRENT_DERIVE, PW, str(threads), *paths]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{threads} threads deriving keys at once did not finish in 60 s (deadlock)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{[4] * threads} []"


@pytest.mark.parametrize("name", sorted(V1_FIXTURES))
def test_v1_fixture_decrypts_and_reencrypts_identically(name: str, tmp_path: Path) -> None:
    """Envelopes made by the first release still open, and sealing the same plaintext under
    the same header gives the same bytes: the KDF output is unchanged to the bit."""
    kdf, size, master = V1_FIXTURES[name]
    raw = (DATA / f"{name}.fallback-env").read_bytes()
    header = EnvelopeHeader.decode(raw)
    assert header.version == 1 and header.kdf == kdf and header.plain_size == size
    assert unseal(PW, raw) == plaintext(size)
    key = EnvelopeKey.derive(PW, header)
    assert key.enc_key == blake3.blake3(
        bytes.fromhex(master), derive_key_context="fallback envelope v1 2025 AES-256-GCM block key"
    ).digest()
    t = EnvelopeTransform(header, key)
    assert seal(t, plaintext(size)) == raw
    out = tmp_path / "out"
    decrypt_file(DATA / f"{name}.fallback-env", out, PW)
    assert out.read_bytes() == plaintext(size)
    with pytest.raises(BadPassphrase):
        EnvelopeTransform.open(PW + "!", raw)


def test_kdf_out_of_memory_is_resource_exhausted() -> None:
    """A header asking for more memory than the process may have fails with a typed,
    retryable error (kind EXHAUSTED, ENOMEM), not a bare MemoryError or a crash."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))\n"
        "from transport.blocks.kdf import argon2id, KdfParams\n"
        "from transport.errors import ResourceExhausted\n"
        "try:\n"
        "    argon2id(b'pw', bytes(16), KdfParams(1 << 20, 1, 1))\n"
        "except ResourceExhausted as exc:\n"
        "    print(exc.resource, exc.kind.name, exc.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.stdout.strip() == "ENOMEM EXHAUSTED argon2id: cannot allocate 1048576 KiB", done.stderr


# --- version 2: one Argon2id per transfer (issue 11 section 5) ----------------------


def ring(passphrase: str = PW, kdf: KdfParams = CHEAP, capacity: int = 256) -> EnvelopeKeyring:
    return EnvelopeKeyring(passphrase, kdf, capacity=capacity)


def reseal_v2(raw: bytes, **changes: int | bytes) -> bytes:
    """Rewrite v2 header fields and recompute the unkeyed checksum: a deliberate forgery."""
    names = ["magic", "version", "kdf", "flags", "memory", "iterations", "lanes", "salt",
             "file_salt", "block_size", "plain_size"]
    fmt = struct.Struct(">5sBBBIII16s16sIQ")
    values = dict(zip(names, fmt.unpack_from(raw), strict=True))
    values.update(changes)
    body = fmt.pack(*(values[n] for n in names)) + raw[fmt.size : 96 - 16]
    return body + blake3.blake3(body).digest(length=16)


def test_v2_header_shape_and_roundtrip() -> None:
    r = ring()
    t = r.for_upload(3 * B + 7, B)
    h = t.envelope
    assert HEADER_SIZES == {1: 80, 2: 96} and MAX_HEADER_SIZE == 96 and VERSIONS == (1, 2)
    assert len(t.header) == h.size == 96 and t.header[5] == 2 and is_envelope(t.header)
    assert h.version == 2 and h.kdf == CHEAP and len(h.salt) == len(h.file_salt) == 16
    assert t.header[20:36] == h.salt and t.header[36:52] == h.file_salt
    assert struct.unpack(">IQ", t.header[52:64]) == (B, 3 * B + 7)
    assert t.name == "envelope-v1" and t.overhead == OVERHEAD  # same wire transform name
    assert t.layout.header_len == 96 and t.layout.stored_range(1) == (96 + B + OVERHEAD,
                                                                      B + OVERHEAD)
    assert EnvelopeHeader.decode(t.header) == h
    assert EnvelopeHeader.decode(t.header + b"block bytes") == h
    data = plaintext(3 * B + 7, seed=21)
    stored = seal(t, data)
    assert len(stored) == t.stored_size() == 96 + len(data) + 4 * OVERHEAD
    t2 = EnvelopeTransform.open(PW, stored)  # no keyring needed: the header is enough
    assert b"".join(t2.decode(i, s) for i, s in enumerate(blocks(t2, stored))) == data


def test_v2_one_derivation_per_transfer_and_per_folder_read(tmp_path: Path) -> None:
    """50 files: one Argon2id to write them, one to read them all back, and each file
    still opens on its own (new keyring, bare ``open``, ``decrypt_file``)."""
    writer = ring()
    assert writer.derivations == 0  # lazily: nothing until the first file
    files = {}
    for k in range(50):
        size = (k * 997) % (3 * B)
        t = writer.for_upload(size, B)
        files[f"f{k}"] = (plaintext(size, seed=k), seal(t, plaintext(size, seed=k)))
    assert writer.derivations == 1
    headers = {t_raw[1][:96] for t_raw in files.values()}
    assert len({h[20:36] for h in headers}) == 1  # one transfer salt ...
    assert len({h[36:52] for h in headers}) == 50  # ... and a salt per file
    reader = ring()
    for data, stored in files.values():
        t = reader.open(stored)
        assert b"".join(t.decode(i, s) for i, s in enumerate(blocks(t, stored))) == data
    assert reader.derivations == 1
    data, stored = files["f7"]
    alone = tmp_path / "f7.env"
    alone.write_bytes(stored)
    decrypt_file(alone, tmp_path / "f7", PW)
    assert (tmp_path / "f7").read_bytes() == data


def test_v2_derives_once_under_concurrency() -> None:
    """Threads uploading and opening at once, before any key exists, share one Argon2id
    run instead of each starting their own."""
    kdf = KdfParams(8192, 2, 1)  # slow enough (~10 ms) that the threads really overlap
    r = ring(kdf=kdf)
    other = ring(kdf=kdf).for_upload(10, B).header  # another transfer's file
    start = threading.Barrier(8)

    def work(k: int) -> tuple[bytes, int]:
        start.wait()
        t = r.for_upload(10, B) if k % 2 else r.open(other)
        return t.header, t.envelope.version

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(work, range(8)))
    assert [v for _, v in done] == [2] * 8
    assert r.derivations == 2  # its own salt once, the other transfer's salt once


def test_v2_per_file_keys_are_independent() -> None:
    """Same transfer, same passphrase, same plaintext: different keys, different bytes,
    and no block moves between files."""
    r = ring()
    data = plaintext(2 * B, seed=5)
    a, b = r.for_upload(len(data), B), r.for_upload(len(data), B)
    assert a.envelope.salt == b.envelope.salt and a.envelope.file_salt != b.envelope.file_salt
    ka, kb = a._key, b._key
    for x, y in ((ka.enc_key, kb.enc_key), (ka.nonce_key, kb.nonce_key),
                 (ka.check_key, kb.check_key)):
        assert x != y and len(x) == len(y) == 32
    sa, sb = blocks(a, seal(a, data)), blocks(b, seal(b, data))
    assert sa[0] != sb[0] and sa[0][:NONCE_SIZE] != sb[0][:NONCE_SIZE]
    with pytest.raises(IntegrityError, match="block 0: authentication failed"):
        a.decode(0, sb[0])
    # A header whose file salt is swapped for another file's is not authentic.
    forged = reseal_v2(a.header, file_salt=b.envelope.file_salt)
    with pytest.raises(BadPassphrase):
        r.open(forged)


def test_v2_header_tampering() -> None:
    r = ring()
    t = r.for_upload(3 * B + 7, B)
    raw = t.header
    for pos in range(96):
        for bit in range(8):
            with pytest.raises((IntegrityError, ProtocolError)):
                EnvelopeHeader.decode(flip(raw, pos, bit))
    for change in ({"plain_size": 0}, {"plain_size": 2 * B}, {"block_size": 2 * B},
                   {"salt": bytes(16)}, {"file_salt": bytes(16)}, {"iterations": 2}):
        forged = reseal_v2(raw, **change)
        EnvelopeHeader.decode(forged)  # well-formed ...
        with pytest.raises(BadPassphrase):  # ... but not authentic
            r.open(forged)
        with pytest.raises(BadPassphrase):
            EnvelopeTransform.open(PW, forged)
    for change in ({"memory": 0xFFFFFFFF}, {"iterations": 10**6}, {"lanes": 0}, {"kdf": 9},
                   {"flags": 1}):
        with pytest.raises(ProtocolError):
            r.open(reseal_v2(raw, **change))
    with pytest.raises(ProtocolError, match="needs 96 bytes, got 80"):
        EnvelopeHeader.decode(raw[:80])
    assert r.derivations == 3  # its own (salt, params), the zero salt, and iterations=2


def test_v2_wrong_passphrase_fails_fast_for_a_folder() -> None:
    """A wrong passphrase is refused per file from the header, and costs one Argon2id per
    transfer salt, not per file."""
    w = ring()
    headers = [w.for_upload(k, B).header for k in range(20)]
    bad = ring("not the passphrase")
    for h in headers:
        with pytest.raises(BadPassphrase):
            bad.open(h)
    assert bad.derivations == 1


def test_keyring_reads_v1_and_v2_in_one_folder() -> None:
    """A folder mixing old (v1, the committed fixtures) and new envelopes opens with one
    keyring; Argon2id runs once per distinct salt."""
    r = ring(kdf=CHEAP)
    mine = [r.for_upload(100, B) for _ in range(3)]
    for name, (_, size, _) in V1_FIXTURES.items():
        raw = (DATA / f"{name}.fallback-env").read_bytes()
        t = r.open(raw)
        assert t.envelope.version == 1
        assert b"".join(t.decode(i, s) for i, s in enumerate(blocks(t, raw))) == plaintext(size)
    for t in mine:
        assert r.open(t.header).envelope == t.envelope
    assert r.derivations == 1 + len(V1_FIXTURES)


def test_keyring_cache_is_bounded() -> None:
    r = ring(capacity=2)
    headers = [ring().for_upload(10, B).header for _ in range(3)]  # three transfers
    for h in headers + headers[-1:]:
        r.open(h)
    assert r.derivations == 3  # the last one was still cached
    r.open(headers[0])  # evicted (least recently used): derived again
    assert r.derivations == 4


def test_keyring_bad_arguments_and_repr() -> None:
    with pytest.raises(ValueError, match="empty passphrase"):
        EnvelopeKeyring("")
    r = ring()
    with pytest.raises(ValueError):
        r.for_upload(10, 100)  # block size below the layout minimum
    assert PW not in repr(r) and "redacted" in repr(r)
    with pytest.raises(ProtocolError, match="not a fallback envelope"):
        r.open(b"plain text" * 20)
    assert r.derivations == 0  # nothing derived for garbage


# Two files of one version 2 transfer, written when the format was introduced.
V2_FIXTURES = {"v2-cheap-a": 2 * B + 7, "v2-cheap-b": 0}


def test_v2_fixtures_decrypt_and_reencrypt_identically() -> None:
    """Pins the version 2 format: committed envelopes open with one derivation and
    sealing the same plaintext under the same header gives the same bytes."""
    r = ring()
    for name, size in V2_FIXTURES.items():
        raw = (DATA / f"{name}.fallback-env").read_bytes()
        t = r.open(raw)
        assert t.envelope.version == 2 and t.envelope.kdf == CHEAP
        assert b"".join(t.decode(i, s) for i, s in enumerate(blocks(t, raw))) == plaintext(size)
        assert seal(t, plaintext(size)) == raw
    assert r.derivations == 1


def test_daemon_serves_v2_envelopes_for_decryption(daemon_factory: Callable[..., Daemon],
                                                   tmp_path: Path) -> None:
    """A real daemon describes v1 and v2 envelopes in one folder (reading each header by its
    own length) and the client decrypts both on download."""
    d = daemon_factory()
    served = d.docroots["alice"] / "mixed"
    served.mkdir(parents=True)
    expected = {}
    r = ring()
    for k, size in enumerate((0, 1, 3 * B + 5)):
        t = r.for_upload(size, B)
        (served / f"new{k}.bin{SUFFIX}").write_bytes(seal(t, plaintext(size, seed=k)))
        expected[f"new{k}.bin"] = plaintext(size, seed=k)
    shutil.copy(DATA / f"v1-cheap{SUFFIX}", served / f"old.bin{SUFFIX}")
    expected["old.bin"] = plaintext(2 * B + 7)
    out = tmp_path / "out"
    rc, res, err = d.transfer(d.url("/mixed"), str(out) + "/", "--decrypt",
                              env={"FALLBACK_FILEPASS": PW})
    assert rc == 0 and res["ok"], err
    assert res["content"] == {f"mixed/{n}": "decrypted" for n in expected}
    got = {p.name: p.read_bytes() for p in (out / "mixed").iterdir()}
    assert got == expected

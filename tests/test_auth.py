"""Tests for fallback.auth and fallback.logincheck: Argon2id/scrypt hashes, credential cache, password checker, Basic
parsing, and the whole-hash check of `config validate`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from argon2.low_level import Type, hash_secret_raw

from fallback.auth import (
    ARGON2_ITERATIONS,
    ARGON2_LANES,
    ARGON2_MEMORY_KIB,
    hash_password,
    hash_password_main,
    parse_basic,
    validate_hash,
    verify_password,
)
from fallback.logincheck import ChecksBusy, CredentialCache, PasswordChecker

PHC_RE = re.compile(
    r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def stored() -> str:
    """One hash shared by the module: each costs ~0.1 s."""
    return hash_password("correct horse")


def test_hash_format(stored: str) -> None:
    m = PHC_RE.fullmatch(stored)
    assert m is not None, stored
    assert len(_unb64(m.group(4))) == 16
    assert len(_unb64(m.group(5))) == 32
    assert "=" not in m.group(4) + m.group(5)  # PHC base64 is unpadded


def test_roundtrip(stored: str) -> None:
    assert verify_password("correct horse", stored)


def test_salt_is_random() -> None:
    assert hash_password("pw") != hash_password("pw")


def test_unicode_password() -> None:
    encoded = hash_password("pässwörd ✓")
    assert verify_password("pässwörd ✓", encoded)
    assert not verify_password("passwörd ✓", encoded)


def test_wrong_password(stored: str) -> None:
    assert not verify_password("correct horse ", stored)
    assert not verify_password("", stored)


def test_tampered_hash_is_false(stored: str) -> None:
    head, digest_b64 = stored.rsplit("$", 1)
    digest = bytearray(_unb64(digest_b64))
    digest[0] ^= 1
    assert not verify_password("correct horse", f"{head}${_b64(bytes(digest))}")
    # A different salt changes the derived key too.
    parts = stored.split("$")
    salt = bytearray(_unb64(parts[4]))
    salt[-1] ^= 0x80
    parts[4] = _b64(bytes(salt))
    assert not verify_password("correct horse", "$".join(parts))


def test_cost_is_rfc9106_second_recommendation(stored: str) -> None:
    """RFC 9106 section 4, second option: m=64 MiB, t=3, p=4 (stronger than OWASP's minimum)."""
    m = PHC_RE.fullmatch(stored)
    assert m is not None
    assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (65536, 3, 4)
    assert (ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES) == (65536, 3, 4)


def test_concurrent_checks_all_return(stored: str) -> None:
    """cryptography 50's Argon2id never returned when two lanes=4 derivations ran on two
    threads at once (the daemon froze); checks must run side by side and finish."""
    results: dict[int, bool] = {}

    def check(i: int) -> None:
        results[i] = verify_password("correct horse" if i % 2 else "wrong", stored)

    threads = [threading.Thread(target=check, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert results == {0: False, 1: True, 2: False, 3: True}


def test_passlib_ab64_variant(stored: str) -> None:
    """passlib writes "." for "+" in its base64; such hashes keep verifying."""
    salt = b"\xfb\xef\xbe" * 5 + b"\x00"  # base64 "++++..."
    digest = hash_secret_raw(b"pw", salt, time_cost=1, memory_cost=8, parallelism=1,
                             hash_len=32, type=Type.ID)
    standard = f"$argon2id$v=19$m=8,t=1,p=1${_b64(salt)}${_b64(digest)}"
    assert "+" in standard
    assert verify_password("pw", standard.replace("+", "."))
    assert not verify_password("pW", standard.replace("+", "."))


def test_parameters_are_read_from_string() -> None:
    """A hash made with other (cheap) parameters verifies: they come from the string.
    Made by cryptography's Argon2id, as this daemon's hash-password did before: old hashes
    keep working with argon2-cffi (one derivation at a time here, which never deadlocked)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    salt = b"0123456789abcdef"
    digest = Argon2id(salt=salt, length=24, iterations=1, lanes=1, memory_cost=64).derive(b"pw")
    encoded = f"$argon2id$v=19$m=64,t=1,p=1${_b64(salt)}${_b64(digest)}"
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)
    # cryptography's own PHC encoder agrees with our format.
    theirs = Argon2id(
        salt=salt, length=32, iterations=1, lanes=1, memory_cost=64
    ).derive_phc_encoded(b"pw")
    assert verify_password("pw", theirs)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "hunter2",
        "argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=16$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$t=1,m=64,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=64,t=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=x,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=4,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=64,t=1,p=1$c2Fs$aGFzaGhhc2g",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$a",
        "$argon2id$v=19$m=64,t=1,p=1$c2Fsd!NhbHQ$aGFzaGhhc2g",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g$extra",
        "$scrypt$ln=14,r=8$c2FsdA$aGFzaA",
        "$scrypt$ln=40,r=8,p=1$c2FsdA$aGFzaA",
        "$bcrypt$2b$12$abcdefghijklmnopqrstuu",
    ],
)
def test_malformed_hash_raises(encoded: str) -> None:
    with pytest.raises(ValueError, match="password hash|argon2id hash|scrypt hash"):
        verify_password("pw", encoded)
    with pytest.raises(ValueError):
        validate_hash(encoded)


def test_malformed_message_does_not_echo_value() -> None:
    with pytest.raises(ValueError) as info:
        verify_password("pw", "my-plaintext-secret")
    assert "my-plaintext-secret" not in str(info.value)


def test_scrypt_form() -> None:
    salt = b"NaCl-and-pepper!"
    digest = hashlib.scrypt(b"open sesame", salt=salt, n=2**14, r=8, p=1, dklen=32)
    encoded = f"$scrypt$ln=14,r=8,p=1${_b64(salt)}${_b64(digest)}"
    assert verify_password("open sesame", encoded)
    assert not verify_password("open sesam", encoded)
    # passlib writes "adapted base64" ('.' instead of '+'); accept it as well.
    ab64 = encoded.replace("+", ".")
    assert verify_password("open sesame", ab64)


def test_scrypt_above_hashlib_default_maxmem() -> None:
    """ln=16,r=8 needs 64 MiB, beyond hashlib's 32 MiB default limit."""
    salt = b"0123456789ab"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**16, r=8, p=1, maxmem=2**27, dklen=32)
    assert verify_password("pw", f"$scrypt$ln=16,r=8,p=1${_b64(salt)}${_b64(digest)}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_hit_is_fast(stored: str) -> None:
    cache = CredentialCache()
    t0 = time.perf_counter()
    assert cache.check("alice", "correct horse", stored)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cache.check("alice", "correct horse", stored)
    second = time.perf_counter() - t0
    assert first > 0.02  # a real Argon2id run
    assert second < first / 20
    assert len(cache) == 1


def test_cache_keyed_on_user_password_and_hash(stored: str) -> None:
    cache = CredentialCache()
    assert cache.check("alice", "correct horse", stored)
    assert not cache.check("alice", "wrong", stored)
    assert cache.check("bob", "correct horse", stored)  # separate entry, verified anew
    assert len(cache) == 2
    other = hash_password("other")
    assert not cache.check("alice", "correct horse", other)  # hash changed: no stale hit


def test_cache_failures_not_cached(stored: str) -> None:
    cache = CredentialCache()
    assert not cache.check("alice", "nope", stored)
    assert not cache.check("alice", "nope", stored)
    assert len(cache) == 0


def test_cache_expiry() -> None:
    clock = FakeClock()
    cache = CredentialCache(ttl=300, clock=clock)
    encoded = _cheap_hash("pw")
    assert cache.check("u", "pw", encoded)
    assert len(cache) == 1
    clock.now += 299
    assert cache.check("u", "pw", encoded)
    clock.now += 2  # 301 s after insertion: expired, re-verified and re-inserted
    assert cache.check("u", "pw", encoded)
    assert len(cache) == 1


def test_cache_expired_entry_with_changed_password_fails() -> None:
    clock = FakeClock()
    cache = CredentialCache(ttl=10, clock=clock)
    encoded = _cheap_hash("pw")
    assert cache.check("u", "pw", encoded)
    clock.now += 11
    assert not cache.check("u", "wrong", encoded)
    assert len(cache) == 0  # the expired entry was pruned


def test_cache_lru_bound() -> None:
    cache = CredentialCache(maxsize=3)
    encoded = {name: _cheap_hash(name) for name in "abcd"}
    for name in "abc":
        assert cache.check(name, name, encoded[name])
    assert cache.check("a", "a", encoded["a"])  # refresh a: b is now the oldest
    assert cache.check("d", "d", encoded["d"])
    assert len(cache) == 3
    keys = list(cache._entries)
    assert cache._digest("b", "b", encoded["b"]) not in keys
    assert cache._digest("a", "a", encoded["a"]) in keys


def test_cache_malformed_hash_raises() -> None:
    with pytest.raises(ValueError):
        CredentialCache().check("u", "pw", "plaintext")


def test_cache_key_is_per_process() -> None:
    a, b = CredentialCache(), CredentialCache()
    assert a._digest("u", "p", "h") != b._digest("u", "p", "h")
    assert a._digest("ab", "c", "h") != a._digest("a", "bc", "h")


def _cheap_hash(password: str) -> str:
    """Argon2id with minimal cost, so cache tests don't spend seconds hashing."""
    salt = b"saltsaltsaltsalt"
    digest = hash_secret_raw(password.encode(), salt, time_cost=1, memory_cost=8, parallelism=1,
                             hash_len=32, type=Type.ID)
    return f"$argon2id$v=19$m=8,t=1,p=1${_b64(salt)}${_b64(digest)}"


def _basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (_basic(b"user:pass"), ("user", "pass")),
        ("basic " + base64.b64encode(b"user:pass").decode(), ("user", "pass")),
        ("BASIC   " + base64.b64encode(b"user:pass").decode() + "  ", ("user", "pass")),
        (_basic(b"user:pa:ss"), ("user", "pa:ss")),
        (_basic(b"user:"), ("user", "")),
        (_basic(b":pass"), ("", "pass")),
        (_basic("jörg:pässword".encode()), ("jörg", "pässword")),
        (_basic("jörg:pässword".encode("latin-1")), ("jörg", "pässword")),
        ("Basic " + base64.b64encode(b"ab:c").decode().rstrip("="), ("ab", "c")),
        (None, None),
        ("", None),
        ("Basic", None),
        ("Basic ", None),
        ("Bearer abc.def", None),
        ("Digest username=x", None),
        (_basic(b"nocolon"), None),
        ("Basic !!!notbase64!!!", None),
        ("Basic dXNlcjpwYXNz=x", None),
        ("Basic a", None),
        ("Basicdxnlcjpwyxnz", None),
    ],
)
def test_parse_basic(header: str | None, expected: tuple[str, str] | None) -> None:
    assert parse_basic(header) == expected


def _run_main(stdin_text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = hash_password_main(io.StringIO(stdin_text), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_hash_password_main() -> None:
    rc, out, err = _run_main(" s3cret pw \nsecond line ignored\n")
    assert rc == 0, err
    assert err == ""
    encoded = out.strip()
    assert out == encoded + "\n"
    assert PHC_RE.fullmatch(encoded)
    assert verify_password(" s3cret pw ", encoded)  # only the newline is stripped


def test_hash_password_main_crlf_and_no_newline() -> None:
    rc, out, _ = _run_main("pw\r\n")
    assert rc == 0 and verify_password("pw", out.strip())
    rc, out, _ = _run_main("pw")
    assert rc == 0 and verify_password("pw", out.strip())


@pytest.mark.parametrize("stdin_text", ["", "\n", "\r\n"])
def test_hash_password_main_empty(stdin_text: str) -> None:
    rc, out, err = _run_main(stdin_text)
    assert rc == 2
    assert out == ""
    assert err.strip() == "error: empty password"


# -- PasswordChecker: own bounded pool, equal work for unknown users ---------------------------

async def test_checker_refuses_beyond_its_backlog(stored: str) -> None:
    checker = PasswordChecker(workers=1, max_pending=2)
    try:
        got = await asyncio.gather(*(checker.check("alice", f"wrong{i}", stored)
                                     for i in range(5)), return_exceptions=True)
        assert [type(g).__name__ for g in got] == ["bool", "bool", "ChecksBusy", "ChecksBusy",
                                                    "ChecksBusy"]
        assert checker.pending == 0
        assert await checker.check("alice", "correct horse", stored)
        # Cached: no hash runs, so even a full backlog does not refuse it.
        blockers = [asyncio.ensure_future(checker.check("bob", f"x{i}", stored)) for i in range(2)]
        await asyncio.sleep(0)
        assert checker.pending == 2
        assert await checker.check("alice", "correct horse", stored)
        with pytest.raises(ChecksBusy):
            await checker.check("alice", "not cached", stored)
        assert await asyncio.gather(*blockers) == [False, False]
    finally:
        checker.shutdown()


async def test_checker_unknown_user_costs_a_default_hash(stored: str) -> None:
    checker = PasswordChecker()
    try:
        # The dummy hash has the default cost, so an unknown name costs what a known one does.
        assert PHC_RE.fullmatch(checker._dummy).groups()[:3] == PHC_RE.fullmatch(
            stored).groups()[:3]
        t0 = time.perf_counter()
        assert not await checker.check("nobody", "correct horse", None)
        unknown = time.perf_counter() - t0
        assert unknown > 0.02  # a real Argon2id run
        assert not await checker.check("nobody", "correct horse", None)  # never cached
        assert len(checker.cache) == 0
    finally:
        checker.shutdown()


async def test_checker_threads_are_its_own(stored: str) -> None:
    names: list[str] = []
    checker = PasswordChecker(workers=2)
    try:
        await checker.check("alice", "wrong", stored)
        names = [t.name for t in threading.enumerate()]
    finally:
        checker.shutdown()
    assert any(n.startswith("fb-auth") for n in names), names


# -- config validation reads the whole hash (issue #14) -----------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("$argon2id$...", "invalid argon2id hash: expected '$argon2id$v=19$m=..,t=..,p=..$salt$hash'"),
    ("$scrypt$...", "invalid scrypt hash: expected '$scrypt$ln=..,r=..,p=..$salt$hash'"),
    ("$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
     "invalid argon2id hash: m must be in 8..4194304 KiB"),
    ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$", "invalid password hash: hash is not valid unpadded base64"),
])
def test_config_validate_reports_unusable_hash(tmp_path: Path, value: str, message: str) -> None:
    """A pasted placeholder passed validation (only the prefix was checked) and then made
    every login of that user a 500; now it is a FILE:LINE problem and the daemon won't start."""
    (tmp_path / "srv").mkdir()
    path = tmp_path / "aspera.conf"
    path.write_text(f"""<?xml version="1.0"?>
<CONF version="2">
<users>
<user><name>alice</name>
<password_hash>{value}</password_hash>
<docroot>{tmp_path / "srv"}</docroot></user>
</users>
</CONF>
""")
    p = subprocess.run([sys.executable, "-m", "fallback", "config", "validate", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p
    assert p.stderr.startswith(f"{path}:5: password_hash: {message}"), p.stderr
    assert "Traceback" not in p.stderr

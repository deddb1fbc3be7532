"""Tests for fallback.tls against a real aiohttp HTTPS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import stat
import subprocess
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fallback.tls import (
    CERT_VALIDITY_DAYS,
    client_ssl,
    ensure_self_signed,
    fingerprint,
    parse_fingerprint,
    server_ssl_context,
)

FP_RE = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


@dataclass(frozen=True, slots=True)
class Pair:
    cert: Path
    key: Path
    fp: str


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    fp = ensure_self_signed(cert, key)
    return Pair(cert, key, fp)


def test_ensure_self_signed_creates_files(pair: Pair) -> None:
    assert pair.cert.is_file() and pair.key.is_file()
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    assert not list(pair.key.parent.glob(".*.tmp"))  # temp files renamed away
    assert re.fullmatch(FP_RE, pair.fp)
    assert fingerprint(pair.cert) == pair.fp


def test_certificate_contents(pair: Pair) -> None:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert CERT_VALIDITY_DAYS <= lifetime.days <= CERT_VALIDITY_DAYS + 1
    assert cert.issuer == cert.subject


def test_custom_names(tmp_path: Path) -> None:
    ensure_self_signed(
        tmp_path / "c.pem",
        tmp_path / "k.pem",
        hostnames=("xfer.example", "xfer"),
        ips=("10.0.0.5",),
    )
    cert = x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xfer.example", "xfer"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_second_call_reuses(pair: Pair) -> None:
    cert_bytes, key_bytes = pair.cert.read_bytes(), pair.key.read_bytes()
    assert ensure_self_signed(pair.cert, pair.key) == pair.fp
    assert pair.cert.read_bytes() == cert_bytes
    assert pair.key.read_bytes() == key_bytes


def test_missing_key_regenerates(pair: Pair) -> None:
    pair.key.unlink()
    fp = ensure_self_signed(pair.cert, pair.key)
    assert fp != pair.fp
    assert fingerprint(pair.cert) == fp


def test_mismatched_pair_rejected(pair: Pair, tmp_path: Path) -> None:
    ensure_self_signed(tmp_path / "other.pem", tmp_path / "other.key")
    with pytest.raises(ValueError, match="does not match"):
        ensure_self_signed(pair.cert, tmp_path / "other.key")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_fingerprint_matches_openssl(pair: Pair) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pair.cert)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # e.g. "sha256 Fingerprint=AB:CD:..." (prefix case differs between versions)
    assert out.split("=", 1)[1] == pair.fp
    assert parse_fingerprint(out) == bytes.fromhex(pair.fp.replace(":", ""))


def test_parse_fingerprint_forms() -> None:
    raw = bytes(range(32))
    colon_upper = ":".join(f"{b:02X}" for b in raw)
    for text in (
        colon_upper,
        colon_upper.lower(),
        raw.hex(),
        raw.hex().upper(),
        "sha256:" + raw.hex(),
        "SHA256=" + colon_upper,
        "SHA256:" + colon_upper,
        "sha256 Fingerprint=" + colon_upper,
        f"  {raw.hex()}\n",
    ):
        assert parse_fingerprint(text) == raw, text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "32 bytes"),
        ("abcd", "32 bytes"),
        ("00" * 20, "got 20 bytes"),
        ("00" * 33, "got 33 bytes"),
        ("zz" * 32, "hexadecimal"),
        ("0" * 63, "hexadecimal"),
        ("AB:CD:E", "colons"),
        ("AB::CD", "colons"),
        ("md5:" + "00" * 32, "invalid fingerprint"),
    ],
)
def test_parse_fingerprint_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_fingerprint(text)


def test_server_context_minimum(pair: Pair) -> None:
    ctx = server_ssl_context(pair.cert, pair.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE


def test_client_ssl_values(pair: Pair) -> None:
    assert client_ssl(None, None, True) is False
    fp = client_ssl(None, pair.fp, False)
    assert isinstance(fp, aiohttp.Fingerprint)
    assert fp.fingerprint == parse_fingerprint(pair.fp)
    ca = client_ssl(pair.cert, None, False)
    assert isinstance(ca, ssl.SSLContext)
    assert ca.check_hostname and ca.verify_mode == ssl.CERT_REQUIRED
    assert ca.minimum_version == ssl.TLSVersion.TLSv1_2
    default = client_ssl(None, None, False)
    assert isinstance(default, ssl.SSLContext)
    assert default.verify_mode == ssl.CERT_REQUIRED
    assert default.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="mutually exclusive"):
        client_ssl(pair.cert, pair.fp, False)
    with pytest.raises(ValueError, match="mutually exclusive"):
        client_ssl(None, pair.fp, True)
    with pytest.raises(ValueError, match="fingerprint"):
        client_ssl(None, "abc", False)


@dataclass(frozen=True, slots=True)
class Server:
    pair: Pair
    port: int

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}/"


@pytest.fixture
async def https_server(pair: Pair) -> AsyncIterator[Server]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.scheme}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(pair.cert, pair.key))
    await site.start()
    try:
        yield Server(pair, site.port)
    finally:
        await runner.cleanup()


async def _get(url: str, ssl_arg: ssl.SSLContext | aiohttp.Fingerprint | bool) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=ssl_arg) as resp:
            assert resp.status == 200
            return await resp.text()


async def test_https_fingerprint_pin(https_server: Server) -> None:
    ssl_arg = client_ssl(None, https_server.pair.fp, False)
    assert await _get(https_server.url(), ssl_arg) == "hello https"
    # The pin also works with plain lowercase hex and a prefix.
    lower = "sha256:" + https_server.pair.fp.replace(":", "").lower()
    assert await _get(https_server.url(), client_ssl(None, lower, False)) == "hello https"


async def test_https_wrong_fingerprint(https_server: Server) -> None:
    wrong = bytearray(parse_fingerprint(https_server.pair.fp))
    wrong[0] ^= 0xFF
    ssl_arg = client_ssl(None, wrong.hex(), False)
    with pytest.raises(aiohttp.ServerFingerprintMismatch):
        await _get(https_server.url(), ssl_arg)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_https_cacert(https_server: Server, host: str) -> None:
    ssl_arg = client_ssl(https_server.pair.cert, None, False)
    assert await _get(https_server.url(host), ssl_arg) == "hello https"


async def test_https_cacert_checks_hostname(https_server: Server, tmp_path: Path) -> None:
    """Same cert, but issued for another name: the hostname check must fail."""
    cert, key = tmp_path / "named.pem", tmp_path / "named.key"
    ensure_self_signed(cert, key, hostnames=("elsewhere.example",), ips=())
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(cert, key))
    await site.start()
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(f"https://127.0.0.1:{site.port}/", client_ssl(cert, None, False))
    finally:
        await runner.cleanup()


async def test_https_default_verification_fails(https_server: Server) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _get(https_server.url(), client_ssl(None, None, False))


async def test_https_insecure(https_server: Server) -> None:
    assert await _get(https_server.url(), client_ssl(None, None, True)) == "hello https"


def _tls11_client_context() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            # SECLEVEL=0 so that our own OpenSSL is willing to offer TLS 1.1:
            # the refusal must come from the server, not from the client side.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ssl.SSLError, ValueError) as exc:
            pytest.skip(f"local OpenSSL cannot offer TLS 1.1: {exc}")
    return ctx


async def _tls_version(port: int, ctx: ssl.SSLContext) -> str | None:
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10
    )
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    return str(version) if version else None


async def test_tls11_client_refused(https_server: Server) -> None:
    ctx = _tls11_client_context()
    # Control: a deliberately permissive server does complete a TLS 1.1
    # handshake with this client, so the refusal below is the server's policy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.load_cert_chain(https_server.pair.cert, https_server.pair.key)
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
        lax.minimum_version = ssl.TLSVersion.TLSv1
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=lax)
    await site.start()
    try:
        version = await _tls_version(site.port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        pytest.skip(f"this OpenSSL build cannot do TLS 1.1 at all: {exc}")
    finally:
        await runner.cleanup()
    assert version == "TLSv1.1"

    # The real server context refuses it (alert, then the connection is closed).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _tls_version(https_server.port, ctx)

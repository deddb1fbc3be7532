"""TLS material for the HTTPS fallback: self-signed certificates, pinning, contexts.

Most deployments have no public certificate for the transfer host, so the daemon
generates a self-signed one on first start and prints its SHA-256 fingerprint;
clients then pin that fingerprint (``--fingerprint``) instead of trusting a CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CERT_VALIDITY_DAYS",
    "certificate_names",
    "client_ssl",
    "ensure_self_signed",
    "host_names",
    "fingerprint",
    "format_fingerprint",
    "parse_fingerprint",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

# 825 days is the longest validity Apple platforms accept for TLS server certs.
CERT_VALIDITY_DAYS = 825
# Back-date notBefore so a client whose clock lags slightly still accepts a fresh cert.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

# "sha256:", "SHA256=", openssl's "SHA256 Fingerprint=", and the daemon's own "SHA256 AB:..".
_FP_PREFIX_RE = re.compile(r"^(?:sha-?256(?:\s+fingerprint)?(?:\s*[:=]\s*|\s+))", re.IGNORECASE)
_FP_COLON_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")
_FP_PLAIN_RE = re.compile(r"[0-9A-Fa-f]*")


def format_fingerprint(digest: bytes) -> str:
    """Format a digest as ``AB:CD:...``, the form ``openssl x509 -fingerprint`` prints."""
    return ":".join(f"{b:02X}" for b in digest)


def _cert_fingerprint(cert: x509.Certificate) -> str:
    return format_fingerprint(cert.fingerprint(hashes.SHA256()))


def fingerprint(cert_pem_path: Path) -> str:
    """SHA-256 fingerprint of the (first) certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes())
    return _cert_fingerprint(cert)


def parse_fingerprint(s: str) -> bytes:
    """Parse a user-supplied SHA-256 fingerprint into 32 raw bytes.

    Accepts what people copy from various tools: ``AB:CD:..`` (openssl), plain hex
    in any case, optionally prefixed with ``sha256:``, ``SHA256=``, openssl's
    ``SHA256 Fingerprint=`` or ``SHA256 `` as the daemon prints it.
    """
    text = _FP_PREFIX_RE.sub("", s.strip(), count=1).strip()
    if ":" in text:
        if not _FP_COLON_RE.fullmatch(text):
            raise ValueError(
                "invalid fingerprint: expected hex byte pairs separated by colons "
                "(e.g. 'AB:CD:...')"
            )
        text = text.replace(":", "")
    elif not _FP_PLAIN_RE.fullmatch(text) or len(text) % 2:
        raise ValueError("invalid fingerprint: expected hexadecimal digits (e.g. 'abcd...')")
    digest = bytes.fromhex(text)
    if len(digest) != 32:
        raise ValueError(
            f"invalid fingerprint: a SHA-256 fingerprint is 32 bytes (64 hex digits), "
            f"got {len(digest)} bytes"
        )
    return digest


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory and rename over *path*.

    The temp file is created with *mode* from the start, so a private key is
    never readable by others, not even briefly; the rename means a crash leaves
    either the old file or the new one, never a truncated one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _load_existing(cert_path: Path, key_path: Path) -> str:
    """Load an existing pair, checking the key belongs to the certificate.

    A mismatched pair would otherwise only show up as handshake failures on the
    client side, which are much harder to diagnose.
    """
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"TLS key {key_path} does not match certificate {cert_path}")
    return _cert_fingerprint(cert)


def ensure_self_signed(
    cert_path: Path,
    key_path: Path,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
) -> str:
    """Return the fingerprint of the cert at *cert_path*, creating a pair if needed.

    If both files exist and the certificate covers every one of *hostnames* and *ips*
    they are reused (so the pinned fingerprint is stable across restarts); a name
    it lacks (a new host name, address or ``cert_names`` entry) means a new pair.  Otherwise a P-256 key and a self-signed, non-CA server certificate
    for *hostnames* and *ips* are written; the key with mode 0600.  The key is
    written first, so an interrupted run leaves no certificate without its key.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists and key_exists:
        missing = missing_names(cert_path, hostnames, ips)
        if not missing:
            return _load_existing(cert_path, key_path)
        log.warning("%s does not cover %s: generating a new self-signed pair (its fingerprint "
                    "changes)", cert_path, ", ".join(missing))
        cert_exists = key_exists = False
    if cert_exists or key_exists:
        log.warning(
            "only one of %s and %s exists; generating a new self-signed pair",
            cert_path,
            key_path,
        )
    if not hostnames and not ips:
        raise ValueError("a certificate needs at least one hostname or IP address")

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    common_name = hostnames[0] if hostnames else ips[0]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        # No KeyUsage extension on purpose: OpenSSL only treats a certificate as
        # self-signed (usable as its own trust anchor via --cacert) when it either
        # lacks KeyUsage or allows keyCertSign, and keyCertSign contradicts CA=false.
        .sign(key, hashes.SHA256())
    )

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return _cert_fingerprint(cert)


def certificate_names(cert_path: Path) -> tuple[list[str], list[str]]:
    """``(dns names, ip addresses)`` in the subjectAltName of the certificate at *cert_path*."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def missing_names(cert_path: Path, hostnames: Sequence[str], ips: Sequence[str]) -> list[str]:
    """The names and addresses the certificate does not cover (all of them if unreadable)."""
    try:
        dns, addrs = certificate_names(cert_path)
    except (ValueError, OSError):
        return [*hostnames, *ips]
    have_dns = {d.lower() for d in dns}
    have_ips = {ipaddress.ip_address(a) for a in addrs}
    return ([h for h in hostnames if h.lower() not in have_dns]
            + [i for i in ips if ipaddress.ip_address(i) not in have_ips])


_DNS_RE = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")


def host_names(bind_address: str, extra: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(dns names, ip addresses)`` a generated certificate should cover on this host.

    ``localhost``, ``127.0.0.1`` and ``::1``; the host's name and fully qualified
    name (``socket.gethostname()``, ``getfqdn()``); the addresses that name resolves
    to (``getaddrinfo``); *bind_address* when it is one specific address; and *extra*
    (the config's ``<cert_names>``: names or addresses). Order is kept, duplicates
    dropped; names that are not valid DNS names (RFC 1123) are left out.
    """
    import socket

    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1", "::1"]

    def add(value: str) -> None:
        v = value.strip().rstrip(".") if not value.strip().startswith("[") else value.strip()[1:-1]
        try:
            ip = ipaddress.ip_address(v.split("%", 1)[0])
        except ValueError:
            if _DNS_RE.fullmatch(v) and v.lower() not in (d.lower() for d in dns):
                dns.append(v.lower())
            return
        if ip.is_unspecified or str(ip) in ips:
            return
        ips.append(str(ip))

    host = socket.gethostname()
    for name in (host, socket.getfqdn()):
        add(name)
    try:
        for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
            add(str(info[4][0]))
    except OSError:  # the host name does not resolve: its names still count
        pass
    add(bind_address)
    for name in extra:
        add(name)
    return dns, ips


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server-side context for the fallback listener; TLS 1.2 is the minimum."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def client_ssl(
    cacert: Path | None, fingerprint: str | None, insecure: bool
) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
    """Build the value for aiohttp's ``ssl=`` argument from the client's options.

    * *cacert*: verify the chain against that CA file (hostname checked).
    * *fingerprint*: pin the server certificate; aiohttp skips chain validation and
      compares the SHA-256 of the leaf, which is what a self-signed cert needs.
    * *insecure*: ``False``, no verification at all (the caller must warn).
    * none of them: verify against the system CAs.

    The options are mutually exclusive; combining them raises ``ValueError``
    because any silent precedence would weaken what the user asked for.
    """
    if sum((cacert is not None, fingerprint is not None, bool(insecure))) > 1:
        raise ValueError("cacert, fingerprint and insecure are mutually exclusive")
    if fingerprint is not None:
        return aiohttp.Fingerprint(parse_fingerprint(fingerprint))
    if insecure:
        return False
    if cacert is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cacert))
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx

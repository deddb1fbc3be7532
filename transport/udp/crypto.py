"""Keys, sealing and replay protection for UDP datagrams.

Every datagram is sealed with AES-256-GCM (``cryptography``'s ``AESGCM``): the clear
20-byte header is the associated data, the nonce is the direction's 12-byte IV XOR the
packet number (RFC 9001 section 5.3's construction), so a nonce never repeats while
packet numbers do not (the sender refuses to go past 2**62, see ``codec.MAX_PN``).

Keys: each path has a 32-byte secret that both ends learn from the authenticated
session control channel (``new_path_secret``), or, when the control channel is plain
HTTP, agree on with X25519 (``X25519Exchange``). HKDF-SHA256 (RFC 5869) expands the
secret into one key and IV per direction, so the two directions never share a nonce
space.

Why an eavesdropper on a plain-HTTP control channel learns nothing from the
exchange: only the two X25519 *public* keys cross it; the shared secret is
``X25519(a, B) = X25519(b, A)`` and computing it from ``A`` and ``B`` alone is the
computational Diffie-Hellman problem on Curve25519 (RFC 7748), believed infeasible.
Both public keys and the session id go into HKDF's ``info``, so the secret is bound
to this session and these keys. An *active* attacker who can rewrite the plain-HTTP
control messages can substitute its own public keys (man in the middle); use HTTPS
for the control channel where that matters.

Replay: ``ReplayWindow`` is a sliding bitmap of the last 4096 packet numbers (RFC 4303
section 3.4.3's anti-replay window); anything older or already seen is dropped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.udp.codec import TAG_SIZE

__all__ = ["DirectionKeys", "PathKeys", "derive_path_keys", "new_path_secret",
           "X25519Exchange", "Sealer", "Opener", "ReplayWindow", "InvalidTag"]

SECRET_SIZE = 32
KEY_SIZE = 32
IV_SIZE = 12
_SALT = b"fallback-udp-v1"
_NONCE = struct.Struct("!IQ")
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class DirectionKeys:
    """AES-256 key (32 bytes) and IV (12 bytes) of one direction."""

    key: bytes
    iv: bytes


@dataclass(frozen=True, slots=True)
class PathKeys:
    """The keys one end seals with (``send``) and opens with (``receive``)."""

    send: DirectionKeys
    receive: DirectionKeys


def new_path_secret() -> bytes:
    """A fresh random 32-byte path secret (for an authenticated, encrypted control channel)."""
    return os.urandom(SECRET_SIZE)


def _expand(secret: bytes, label: bytes) -> DirectionKeys:
    okm = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE + IV_SIZE, salt=_SALT,
               info=b"fallback udp v1 " + label).derive(secret)
    return DirectionKeys(okm[:KEY_SIZE], okm[KEY_SIZE:])


def derive_path_keys(secret: bytes, *, initiator: bool) -> PathKeys:
    """Per-direction keys from a path secret (HKDF-SHA256, RFC 5869).

    ``initiator`` is True on the end that opened the session (the client), False on the
    daemon; each end's ``send`` keys are the other's ``receive`` keys. ``ValueError``
    when the secret is shorter than 32 bytes.
    """
    if len(secret) < SECRET_SIZE:
        raise ValueError("a path secret has at least 32 bytes")
    a = _expand(secret, b"initiator")
    b = _expand(secret, b"responder")
    return PathKeys(send=a, receive=b) if initiator else PathKeys(send=b, receive=a)


class X25519Exchange:
    """One side of an X25519 agreement (RFC 7748) for a plain-HTTP control channel.

    Each side sends ``public_bytes`` (32 bytes) over control, then calls
    ``path_secret(peer_public, session_id, initiator=...)``; both get the same secret.
    """

    __slots__ = ("_private", "public_bytes")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public_bytes = self._private.public_key().public_bytes_raw()

    def path_secret(self, peer_public: bytes, session_id: str | bytes, *,
                    initiator: bool) -> bytes:
        """32-byte secret: HKDF(X25519 shared, info = initiator pub | responder pub | id).

        ``ValueError`` for a malformed peer key or an all-zero shared secret (a
        low-order point, RFC 7748 section 6.1).
        """
        if len(peer_public) != 32:
            raise ValueError("X25519 public keys are 32 bytes")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        if not any(shared):
            raise ValueError("X25519 shared secret is zero (low-order peer key)")
        mine, theirs = self.public_bytes, bytes(peer_public)
        first, second = (mine, theirs) if initiator else (theirs, mine)
        sid = session_id.encode() if isinstance(session_id, str) else bytes(session_id)
        info = b"fallback udp x25519 v1|" + first + second + sid
        return HKDF(algorithm=hashes.SHA256(), length=SECRET_SIZE, salt=_SALT,
                    info=info).derive(shared)


NONCE = _NONCE


class Sealer:
    """Seals datagrams of one direction: ``nonce = iv XOR packet number``.

    ``aead``, ``iv_hi`` and ``iv_lo`` are public so the hot path can inline
    ``NONCE.pack(iv_hi, iv_lo ^ pn)`` (packet numbers stay below 2**62).
    """

    __slots__ = ("aead", "iv_hi", "iv_lo")

    def __init__(self, keys: DirectionKeys) -> None:
        self.aead = AESGCM(keys.key)
        self.iv_hi, self.iv_lo = _NONCE.unpack(keys.iv)

    def nonce(self, pn: int) -> bytes:
        return _NONCE.pack(self.iv_hi, (self.iv_lo ^ pn) & _U64)

    def seal_into(self, pn: int, aad: bytes | memoryview, plain: bytes | memoryview,
                  out: memoryview) -> None:
        """Write ciphertext and tag of ``plain`` into ``out`` (exactly len(plain) + 16)."""
        self.aead.encrypt_into(_NONCE.pack(self.iv_hi, (self.iv_lo ^ pn) & _U64),
                                plain, aad, out)

    def seal(self, pn: int, aad: bytes, plain: bytes | memoryview) -> bytes:
        return self.aead.encrypt(self.nonce(pn), plain, aad)


class Opener:
    """Opens datagrams of one direction; ``open`` raises ``InvalidTag`` on any tampering."""

    __slots__ = ("aead", "iv_hi", "iv_lo")

    def __init__(self, keys: DirectionKeys) -> None:
        self.aead = AESGCM(keys.key)
        self.iv_hi, self.iv_lo = _NONCE.unpack(keys.iv)

    def open(self, pn: int, aad: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
        if len(sealed) < TAG_SIZE:
            raise InvalidTag()
        return self.aead.decrypt(_NONCE.pack(self.iv_hi, (self.iv_lo ^ pn) & _U64),
                                  sealed, aad)


class ReplayWindow:
    """Anti-replay window over the last ``size`` packet numbers (RFC 4303 section 3.4.3).

    Kept as a ring of ``size`` slots holding the packet number last accepted in each
    (``slots[pn % size]``), which needs no shifting and no clearing: ``pn`` within the
    window was seen iff its slot holds ``pn`` (a slot holding ``pn - k * size`` is
    stale, one holding ``pn + k * size`` would put ``pn`` outside the window). ``size``
    must be a power of two. ``check(pn)`` is the cheap test made *before* the AEAD;
    ``mark(pn)`` records an authenticated packet. Memory: ``size`` list slots.
    """

    __slots__ = ("size", "mask", "highest", "slots")

    def __init__(self, size: int = 4096) -> None:
        if size & (size - 1):
            raise ValueError("replay window size must be a power of two")
        self.size = size
        self.mask = size - 1
        self.highest = -1
        self.slots = [-1] * size

    def check(self, pn: int) -> bool:
        """True when ``pn`` is neither older than the window nor already seen."""
        d = self.highest - pn
        if d < 0:
            return True
        return d < self.size and self.slots[pn & self.mask] != pn

    def mark(self, pn: int) -> None:
        self.slots[pn & self.mask] = pn
        if pn > self.highest:
            self.highest = pn

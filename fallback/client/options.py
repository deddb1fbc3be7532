"""The options of a transfer (``fallback transfer``'s flags, ``transfer(**options)``)."""

from __future__ import annotations

from dataclasses import dataclass

from fallback.errors import UsageError
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.plan import DEFAULT_RESUME, OVERWRITE_MODES, RESUME_MODES


@dataclass(frozen=True, slots=True)
class Options:
    transport: str = "auto"
    streams: int = 4
    resume: str = DEFAULT_RESUME
    overwrite: str = "diff"
    cacert: str | None = None
    fingerprint: str | None = None
    insecure: bool = False
    user: str | None = None
    password: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    encrypt: bool = False
    decrypt: bool = False
    passphrase: str | None = None
    fsync: bool = True

    def check(self) -> None:
        if self.transport not in ("auto", "udp", "http", "https"):
            raise UsageError(f"--transport must be auto, udp, http or https, not {self.transport!r}")
        if not 1 <= self.streams <= 64:
            raise UsageError("--streams must be between 1 and 64")
        if self.resume not in RESUME_MODES:
            raise UsageError(f"--resume must be one of {', '.join(RESUME_MODES)}")
        if self.overwrite not in OVERWRITE_MODES:
            raise UsageError(f"--overwrite must be one of {', '.join(OVERWRITE_MODES)}")
        if (self.encrypt or self.decrypt) and not self.passphrase:
            raise UsageError("encryption needs a passphrase: set FALLBACK_FILEPASS")


def strong_passphrase(p: str) -> bool:
    """The rule behind ``content_protection_strong_pass_required``: at least 12
    characters and at least three of: lower case, upper case, digits, symbols."""
    classes = [any(c.islower() for c in p), any(c.isupper() for c in p),
               any(c.isdigit() for c in p), any(not c.isalnum() for c in p)]
    return len(p) >= 12 and sum(classes) >= 3

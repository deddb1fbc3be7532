"""The options of a transfer (``fallback transfer``'s flags, ``transfer(**options)``)."""

from __future__ import annotations

from dataclasses import dataclass

from fallback.control import MAX_RATE, Flow
from fallback.errors import UsageError
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.pacing import parse_rate, policy_names
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
    target_rate: str | float | None = None
    """Cap in bits per second, or as ``ascp -l`` writes it (``"20M"``; a bare number is
    Kbps); None or 0: no cap. The server's configured cap wins when lower."""
    min_rate: str | float | None = None
    policy: str = "fair"

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
        if self.policy not in policy_names():
            raise UsageError(f"--policy must be one of {', '.join(policy_names())}")
        target, floor = self.target_bps, _bps(self.min_rate, "--min-rate")
        if floor and target and floor > target:
            raise UsageError("--min-rate must not exceed --target-rate")

    @property
    def target_bps(self) -> int:
        """``target_rate`` in bits per second, 0 for no cap; ``UsageError`` when malformed."""
        return _bps(self.target_rate, "--target-rate")

    def flow(self) -> Flow | None:
        """What the client asks the daemon for (None: nothing asked)."""
        target, floor = self.target_bps, _bps(self.min_rate, "--min-rate")
        if not (target or floor or self.policy != "fair"):
            return None
        return Flow(target, floor, self.policy)


def _bps(value: str | float | None, what: str) -> int:
    if value is None or value == 0:
        return 0
    try:
        rate = parse_rate(value) if isinstance(value, str) else float(value)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if not 1 <= rate <= MAX_RATE:  # also refuses NaN
        raise UsageError(f"{what} must be a positive rate (bits/s) up to {MAX_RATE}")
    return int(rate)


def strong_passphrase(p: str) -> bool:
    """The rule behind ``content_protection_strong_pass_required``: at least 12
    characters and at least three of: lower case, upper case, digits, symbols."""
    classes = [any(c.islower() for c in p), any(c.isupper() for c in p),
               any(c.isdigit() for c in p), any(not c.isalnum() for c in p)]
    return len(p) >= 12 and sum(classes) >= 3

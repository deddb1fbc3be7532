"""The options of a transfer (``fallback transfer``'s flags, ``transfer(**options)``).

``Options.from_keywords`` is how ``transfer()`` and ``transfer_async()`` take them:
an ``Options`` object or keywords, never both; an unknown keyword or a bad value
is a ``UsageError`` before any connection. Sizes (``block_size``) and rates
(``target_rate``, ``min_rate``) accept what the CLI accepts: ``"4M"``, ``"20M"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fallback.control import MAX_RATE, Flow
from fallback.errors import UsageError
from fallback.proxy import NO_PROXY_WORDS, parse_proxy
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.pacing import parse_rate, policy_names
from transport.blocks.plan import DEFAULT_RESUME, OVERWRITE_MODES, RESUME_MODES
from transport.udp.codec import MAX_DATAGRAM, MIN_DATAGRAM

if TYPE_CHECKING:
    from fallback.client.failover import FailoverConfig

CONNECT_TIMEOUT = 5.0
"""Default seconds for a TCP connect: a SYN and two retransmissions (RFC 6298 section 2:
an initial retransmission timeout of 1 s, doubled: answers by 1 + 2 s) with room."""
RETRIES = 10
"""Default re-connections once every path is down (``--retries``)."""
RETRY_TIMEOUT = 60.0
"""Default seconds of retrying, from the moment every path was down (``--retry-timeout``)."""


@dataclass(frozen=True, slots=True)
class Options:
    transport: str = "auto"
    streams: int = 4
    resume: str = DEFAULT_RESUME
    overwrite: str = "diff"
    cacert: str | None = None
    """A CA or the daemon's certificate (PEM) to verify it with: a path (a str or a
    ``os.PathLike``)."""
    fingerprint: str | None = None
    insecure: bool = False
    user: str | None = None
    password: str | None = None
    block_size: int | str = DEFAULT_BLOCK_SIZE
    """Bytes per block for uploads, 4K..64M; an int or a size as the CLI writes it (``"4M"``)."""
    encrypt: bool = False
    decrypt: bool = False
    passphrase: str | None = None
    fsync: bool = True
    target_rate: str | float | None = None
    """Cap in bits per second, or as ``ascp -l`` writes it (``"20M"``; a bare number is
    Kbps); None or 0: no cap. The server's configured cap wins when lower."""
    min_rate: str | float | None = None
    policy: str = "fair"
    udp_port: int | None = None
    """UDP port to send to (``-O``); None: the one the daemon's answer names."""
    datagram_size: int | None = None
    """UDP payload bytes per datagram (``-Z``), sent from the start. None: path MTU
    discovery, from 1,452 bytes (fits any 1,500-byte MTU path) up to the largest datagram
    the route carries unfragmented once a probe of that size crosses the path (65,000
    on loopback, 8,972 on a jumbo-frame LAN; ``fallback.client.udppath``)."""
    symbolic_links: str = "follow"
    """Symbolic links met inside a source folder (an upload): ``follow`` carries a link to a
    file as that file when its target lies inside the source folder and skips (and reports)
    one leading outside it; ``follow-all`` carries every link to a file (ascp's ``follow``);
    ``skip`` carries none. Links to folders are never followed (no loops); every link not
    carried is in ``skipped_files``. A source named itself is always followed, as cp does."""
    filters: tuple[tuple[str, str], ...] = ()
    """ascp ``-N``/``-E`` rules, in order: ``("include"|"exclude", pattern)``; the first rule
    matching a file or folder decides, none matching includes it (``fallback.client.filters``)."""
    dry_run: bool = False
    """List what would be moved (``skipped_files`` says what would not); move nothing."""

    def __new__(cls, *args: Any, **keywords: Any) -> Options:
        # ``Options(bogus=1)`` is a UsageError naming the keyword, as ``transfer(bogus=1)``
        # is, not the dataclass's raw TypeError.
        names = [f.name for f in dataclasses.fields(cls)]
        _known(keywords, names)
        if len(args) > len(names):
            raise UsageError(f"Options takes at most {len(names)} values, got {len(args)}")
        return object.__new__(cls)

    @classmethod
    def from_keywords(cls, options: Options | None, keywords: dict[str, Any], *,
                      flags: bool = False) -> Options:
        """The options of a ``transfer()`` call: ``options`` or ``keywords``, checked.
        Raises ``UsageError`` for both given, an unknown keyword or a bad value; its
        message names the keyword (``streams``), or with ``flags`` the CLI's flag
        (``--streams``: the CLI builds its options here)."""
        if options is not None and keywords:
            raise UsageError("give an Options object or keywords, not both "
                             f"(got options and {', '.join(sorted(keywords))})")
        if options is not None and not isinstance(options, Options):
            raise UsageError(f"options must be an Options object, not {type(options).__name__}")
        if options is None:
            options = cls(**keywords)
        return options.checked(flags=flags)

    def checked(self, *, flags: bool = False) -> Options:
        """These options with sizes parsed to ints and paths to strings, after ``check``."""
        n = _namer(flags)
        bs = self.block_size
        if isinstance(bs, str):
            from fallback.client.sizes import parse_size

            bs = parse_size(bs, n("block_size"))
        changes: dict[str, Any] = {"block_size": bs} if bs != self.block_size else {}
        if isinstance(self.cacert, os.PathLike):
            changes["cacert"] = os.fspath(self.cacert)
        opts = dataclasses.replace(self, **changes) if changes else self
        opts.check(flags=flags)
        return opts
    proxy: str | None = None
    """``--proxy``: ``http://[user:password@]host:port`` (``"none"``: direct); None: from
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (``fallback.proxy``)."""
    fallback: bool = True
    """``--transport auto`` may use the daemon's other scheme (HTTPS <-> HTTP) when the
    URL's cannot be reached, and HTTP(S) when UDP is lost mid-transfer; False:
    ``--no-fallback`` (neither: once on UDP, a lost UDP path fails the transfer)."""
    fallback_port: int | None = None
    """The other scheme's port when the URL's cannot be reached and the daemon's ``/info``
    is not known yet (as ascp ``-t``); None: 8080 for HTTP, 8443 for HTTPS."""
    connect_timeout: float = CONNECT_TIMEOUT
    """Seconds a TCP connect (to the daemon or the proxy) may take before it counts as
    unreachable."""
    retries: int = RETRIES
    """Times the transfer re-connects (re-opening its session) once every path is down."""
    retry_timeout: float = RETRY_TIMEOUT
    """Seconds, from the moment every path was down, after which retrying stops (exit 1,
    partials kept)."""
    udp_probe_timeout: float = 1.5
    """``--transport auto``: seconds in all the UDP probe may take (a few PROBEs) before
    HTTP(S), which started at once, goes on alone (``fallback.client.failover``)."""
    udp_lost_after: float = 2.0
    """Seconds without a word from the daemon's UDP path, while it has work, after which
    the remaining blocks go over HTTP(S)."""

    def failover_config(self) -> FailoverConfig:
        """When ``--transport auto`` leaves UDP and comes back (``--no-fallback``: never
        leaves it once on it)."""
        from fallback.client.failover import FailoverConfig

        return FailoverConfig(probe_budget=self.udp_probe_timeout, lost_after=self.udp_lost_after,
                              stay=not self.fallback)

    def check(self, *, flags: bool = False) -> None:
        """Raise ``UsageError`` for any bad value (types included), naming the keyword, or
        with ``flags`` the CLI's flag."""
        from transport.blocks.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

        n = _namer(flags)
        for name in ("transport", "resume", "overwrite", "policy", "symbolic_links"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{n(name)} must be a string, not {getattr(self, name)!r}")
        for name in ("cacert", "fingerprint", "user", "proxy"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UsageError(f"{n(name)} must be a string"
                                 + (" or a path" if name == "cacert" else "")
                                 + f" or None, not {value!r}")
            if not value.strip():
                raise UsageError(f"{n(name)} is empty" + (": name a file" if name == "cacert"
                                                          else ""))
        for name in ("password", "passphrase"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{n(name)} must be a string or None, not "
                                 f"{type(value).__name__}")  # never echo a secret

        for name in ("retries", "datagram_size"):
            value = getattr(self, name)
            if name == "datagram_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{n(name)} must be an integer, not {value!r}")
        for name in ("retry_timeout", "connect_timeout", "udp_probe_timeout", "udp_lost_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UsageError(f"{n(name)} must be a number of seconds, not {value!r}")
        for name in ("udp_port", "fallback_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UsageError(f"{n(name)} must be a port number or None, not {value!r}")
        if not isinstance(self.filters, tuple | list):
            raise UsageError(f"{n('filters')} must be a sequence of ('include'|'exclude', pattern) "
                             f"rules, not {self.filters!r}")
        for name in ("streams", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{n(name)} must be an integer"
                                 + (" or a size such as '4M'" if name == "block_size" else "")
                                 + f", not {value!r}")
        bs = self.block_bytes
        for name in ("insecure", "encrypt", "decrypt", "fsync", "dry_run"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{n(name)} must be True or False, not {getattr(self, name)!r}")
        if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
            raise UsageError(f"{n('block_size')} must be between 4K and 64M, not {bs}")
        if self.symbolic_links not in SYMLINK_POLICIES:
            raise UsageError(f"{n('symbolic_links')} must be one of {', '.join(SYMLINK_POLICIES)}, "
                             f"not {self.symbolic_links!r}")
        for rule in self.filters:
            if (not isinstance(rule, tuple) or len(rule) != 2 or rule[0] not in ("include", "exclude")
                    or not isinstance(rule[1], str) or not rule[1]):
                raise UsageError(f"{n('filters')}: each rule is ('include'|'exclude', pattern), not {rule!r}")
        from fallback.client.filters import compile_rules

        compile_rules(self.filters)  # a bad pattern is a UsageError now, before connecting
        if self.transport not in ("auto", "udp", "http", "https"):
            raise UsageError(f"{n('transport')} must be auto, udp, http or https, not {self.transport!r}")
        if not 1 <= self.streams <= 64:
            raise UsageError(f"{n('streams')} must be between 1 and 64")
        if self.resume not in RESUME_MODES:
            raise UsageError(f"{n('resume')} must be one of {', '.join(RESUME_MODES)}")
        if self.overwrite not in OVERWRITE_MODES:
            raise UsageError(f"{n('overwrite')} must be one of {', '.join(OVERWRITE_MODES)}")
        if (self.encrypt or self.decrypt) and not self.passphrase:
            raise UsageError("encryption needs a passphrase: "
                             + ("set FALLBACK_FILEPASS" if flags else "give passphrase="))
        if self.policy not in policy_names():
            raise UsageError(f"{n('policy')} must be one of {', '.join(policy_names())}")
        if self.udp_port is not None and not 1 <= self.udp_port <= 65535:
            raise UsageError(f"{n('udp_port')} must be between 1 and 65535")
        if self.datagram_size is not None and not (
                MIN_DATAGRAM <= self.datagram_size <= MAX_DATAGRAM):
            raise UsageError(f"{n('datagram_size')} must be between {MIN_DATAGRAM} and {MAX_DATAGRAM}")
        target, floor = _bps(self.target_rate, n("target_rate")), _bps(self.min_rate, n("min_rate"))
        if floor and target and floor > target:
            raise UsageError(f"{n('min_rate')} must not exceed {n('target_rate')}")
        if not 0 <= self.retries <= 1000:
            raise UsageError(f"{n('retries')} must be between 0 and 1000")
        if not 0 < self.retry_timeout <= 86400:  # also refuses NaN
            raise UsageError(f"{n('retry_timeout')} must be a positive number of seconds up to 86400")
        if not 0 < self.connect_timeout <= 600:
            raise UsageError(f"{n('connect_timeout')} must be a positive number of seconds up to 600")
        if self.fallback_port is not None and not 0 < self.fallback_port < 65536:
            raise UsageError(f"{n('fallback_port')} must be a port number (1-65535)")
        if not 0 < self.udp_probe_timeout <= 60:
            raise UsageError(f"{n('udp_probe_timeout')} must be a positive number of seconds up to 60")
        if not 0 < self.udp_lost_after <= 600:
            raise UsageError(f"{n('udp_lost_after')} must be a positive number of seconds up to 600")
        if self.proxy is not None and self.proxy.strip().lower() not in NO_PROXY_WORDS:
            parse_proxy(self.proxy, n("proxy"))  # a bad proxy URL is a UsageError now

    @property
    def block_bytes(self) -> int:
        """``block_size`` in bytes (a ``"4M"`` string parsed; ``UsageError`` when malformed)."""
        if isinstance(self.block_size, str):
            from fallback.client.sizes import parse_size

            return parse_size(self.block_size, "block_size")
        return self.block_size

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


SYMLINK_POLICIES = ("follow", "follow-all", "skip")

CLI_FLAGS = {"fsync": "--no-fsync", "fallback": "--no-fallback", "filters": "-N/-E",
             "passphrase": "FALLBACK_FILEPASS", "password": "the password"}
"""The CLI's names for the fields whose flag is not ``--`` and the field's name."""


def _namer(flags: bool) -> Callable[[str], str]:
    """How a check names a field: the keyword (the API), or the CLI's flag."""
    if not flags:
        return lambda name: name
    return lambda name: CLI_FLAGS.get(name, "--" + name.replace("_", "-"))


def _known(keywords: dict[str, Any], names: list[str]) -> None:
    """``UsageError`` for a keyword that is no field, with the closest field's name."""
    for key in keywords:
        if key not in names:
            near = difflib.get_close_matches(key, names, 1)
            raise UsageError(f"unknown option {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
"""``--symbolic-links`` values (``Options.symbolic_links``)."""


def _bps(value: str | float | None, what: str) -> int:
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{what} must be a rate such as '20M' or a number of bits/s, "
                         f"not {value!r}")
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

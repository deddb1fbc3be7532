"""Which HTTP proxy, if any, the client goes through to reach a daemon.

As curl and ascp ``-x`` do: ``--proxy URL`` (``transfer(proxy=...)``) names
one; otherwise ``HTTPS_PROXY`` for ``https://`` daemons and ``HTTP_PROXY`` for
``http://`` ones (lower case too, read by ``urllib.request.getproxies``).
``NO_PROXY`` lists hosts reached directly (``urllib.request.proxy_bypass``:
names, domain suffixes, ``*``; it applies to ``--proxy`` too, as in curl);
``--proxy none`` turns every proxy off. The proxy itself is spoken to in
plain HTTP (``http://[user:password@]host:port``): ``CONNECT`` for HTTPS (TLS to
the daemon runs inside the tunnel, so certificate pinning is unchanged) and
absolute-form requests for HTTP, by aiohttp (``proxy=``). Credentials in the
proxy URL go out as ``Proxy-Authorization: Basic`` (RFC 9110 section 11.7.2).

A proxy carries no UDP: the engine does not probe UDP through one.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fallback.errors import UsageError

NO_PROXY_WORDS = ("none", "off", "direct")
"""``--proxy`` values that mean: connect directly, whatever the environment says."""
_HOST = re.compile(r"[A-Za-z0-9._~%:-]+")
"""A host name, an IPv4 address or an IPv6 one (without its brackets)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: ``url`` for aiohttp's ``proxy=`` (credentials included, which aiohttp
    sends as ``Proxy-Authorization: Basic``), ``address`` (``http://host:port``, for
    messages), whether credentials go with it, and where it came from (``--proxy``,
    ``HTTPS_PROXY``...)."""

    url: str = field(repr=False)
    address: str
    source: str
    authenticated: bool = False

    @property
    def shown(self) -> str:
        """For logs and messages: the address, never the password."""
        return self.address + (" (with credentials)" if self.authenticated else "")


def parse_proxy(text: str, source: str) -> Proxy:
    """``http://[user[:password]@]host[:port]`` (a bare ``host:port`` too); ``UsageError``."""
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    try:
        u = urlsplit(raw)
        port = u.port
    except ValueError as exc:
        raise UsageError(f"{source}: bad proxy URL {text!r}: {exc}") from None
    if u.scheme != "http" or not u.hostname or not _HOST.fullmatch(u.hostname) \
            or any(c.isspace() for c in raw):
        raise UsageError(f"{source}: bad proxy URL {text!r}: expected "
                         "http://[user:password@]host:port (the proxy is spoken to in plain HTTP)")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    address = f"http://{host}:{port or 80}"
    cred = u.netloc.rpartition("@")[0]  # still percent-encoded, as the URL carries it
    url = f"http://{cred}@{host}:{port or 80}" if cred else address
    return Proxy(url, address, source, bool(cred))


def proxy_for(scheme: str, host: str, explicit: str | None) -> Proxy | None:
    """The proxy for a daemon at ``scheme://host``, or None to connect directly.

    ``explicit`` is ``--proxy`` (None: look at the environment). ``NO_PROXY``
    (or ``no_proxy``) matching ``host`` means direct in both cases.
    """
    if explicit is not None and explicit.strip().lower() in NO_PROXY_WORDS:
        return None
    env = urllib.request.getproxies_environment()
    if "no" in env and urllib.request.proxy_bypass(host):
        return None
    if explicit is not None:
        return parse_proxy(explicit, "--proxy")
    found = env.get(scheme)
    if not found:
        return None
    return parse_proxy(found, f"{scheme.upper()}_PROXY")

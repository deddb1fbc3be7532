"""User-space WAN link emulator between two network namespaces (no kernel netem needed)."""

from bench.netem.config import LinkConfig
from bench.netem.link import BaseLink, EmulatedLink, make_link

__all__ = ["BaseLink", "EmulatedLink", "LinkConfig", "make_link"]

"""Where a daemon password comes from, in the order scp, curl and ascp users expect.

1. the URL (``https://alice:secret@host/...``);
2. ``--password-file FILE`` (its first line; CLI only);
3. ``$FALLBACK_PASSWORD``;
4. ``~/.netrc`` (``machine HOST login USER password SECRET``; stdlib ``netrc``),
   which may also supply the user name when neither the URL nor ``--user`` does;
5. a prompt, when standard input is a terminal (CLI only; ``getpass``, as
   ``scp`` and ``curl -u user`` do).

The Python API (``transfer(password=...)``) takes an explicit password first,
then steps 1, 3 and 4; it never prompts.
"""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass
from pathlib import Path

from fallback.errors import UsageError

__all__ = ["PASSWORD_ENV", "Credentials", "from_netrc", "read_password_file"]

PASSWORD_ENV = "FALLBACK_PASSWORD"
log = logging.getLogger("fallback.client")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password, and where the password came from (for ``-v``)."""

    user: str | None
    password: str | None
    source: str  # "url", "--password-file", "FALLBACK_PASSWORD", "netrc", "prompt", "argument", ""


def netrc_path() -> Path:
    return Path(os.path.expanduser("~/.netrc"))


def from_netrc(host: str, user: str | None) -> tuple[str | None, str | None]:
    """``(login, password)`` of ``~/.netrc``'s entry for ``host`` (or its ``default``);
    the password only when the entry's login is ``user`` or ``user`` is unknown.
    A missing file gives ``(None, None)``; an unreadable or malformed one is logged and
    ignored (curl does the same), so it never blocks a password from the prompt."""
    path = netrc_path()
    if not path.exists():
        return None, None
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None, None
    if auth is None:
        return None, None
    login, _account, password = auth
    if user is not None and login and login != user:
        return None, None
    return login or None, password or None


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line ending; ``UsageError`` when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError as exc:
        raise UsageError(f"--password-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--password-file {path}: not UTF-8 text") from None
    pw = first.rstrip("\r\n")
    if not pw:
        raise UsageError(f"--password-file {path}: the first line is empty")
    return pw


def resolve(host: str, user: str | None, url_password: str | None, *,
            password_file: str | None = None, explicit: str | None = None) -> Credentials:
    """Steps 1-4 above (no prompt): the first source that has a password wins."""
    if explicit is not None:
        return Credentials(user, explicit, "argument")
    if url_password is not None:
        return Credentials(user, url_password, "url")
    if password_file is not None:
        return Credentials(user, read_password_file(password_file), "--password-file")
    env = os.environ.get(PASSWORD_ENV)
    if env is not None:
        return Credentials(user, env, PASSWORD_ENV)
    login, pw = from_netrc(host, user)
    if pw is not None:
        return Credentials(user or login, pw, "netrc")
    return Credentials(user or login, None, "")

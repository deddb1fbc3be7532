"""What the benchmark's reference peers need installed, checked before a run.

On a fresh machine ``python -m bench`` used to start every scenario and fail each
one with ``No such file or directory: '/usr/sbin/nginx'``. Now the run looks for
the tools first, says in one line what to install (or installs it with
``--install-peers``), and still measures our own rows: a peer whose tool is
missing gets a row marked "not measured (nginx missing)".
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys

__all__ = ["PACKAGES", "PEER_TOOLS", "install", "install_line", "missing_for", "missing_tools"]

PACKAGES: dict[str, str] = {
    "nginx": "nginx-light",
    "curl": "curl",
    "aria2c": "aria2",
    "iperf3": "iperf3",
    "openssl": "openssl",
    "rsync": "rsync",
}
"""Each tool and the Debian package that provides it."""

_NGINX = ("nginx", "openssl")  # nginx serves a certificate made with openssl
PEER_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("curl-*", ("curl", *_NGINX)),
    ("tar+curl*", ("curl", *_NGINX)),
    ("aria2c*", ("aria2c", *_NGINX)),
    ("iperf3*", ("iperf3",)),
    ("rsync*", ("rsync",)),
    ("ours*", ()),
)
"""Peer keys (shell globs, as ``--peers`` takes them) and the tools each needs."""

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def search_path(path: str | None = None) -> str:
    """*path* as given, else ``$PATH`` plus the sbin folders (nginx lives in /usr/sbin, which
    is not on a normal user's PATH)."""
    if path is not None:
        return path
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(parts + [d for d in SBIN if d not in parts])


def missing_tools(path: str | None = None) -> list[str]:
    """The tools of ``PACKAGES`` not found on *path* (see ``search_path``), in its order."""
    where = search_path(path)
    return [t for t in PACKAGES if shutil.which(t, path=where) is None]


def missing_for(peer: str, missing: list[str] | tuple[str, ...]) -> list[str]:
    """The missing tools peer *peer* (a key such as ``curl-https``) needs; empty to run it."""
    for pattern, tools in PEER_TOOLS:
        if fnmatch.fnmatchcase(peer, pattern):
            return [t for t in tools if t in missing]
    return []


def install_line(missing: list[str]) -> str:
    """One line: what is missing, and the command that installs it."""
    pkgs = " ".join(dict.fromkeys(PACKAGES[t] for t in missing))
    return (f"{', '.join(missing)} not found: their rows will be 'not measured'; install them "
            f"with: apt-get install {pkgs}  (or run python -m bench --install-peers)")


def install(missing: list[str]) -> int:
    """``apt-get install -y`` the packages of *missing*; the exit code of apt-get."""
    pkgs = list(dict.fromkeys(PACKAGES[t] for t in missing))
    if not pkgs:
        return 0
    apt = shutil.which("apt-get", path=search_path())
    if apt is None:
        print(f"apt-get not found: install {' '.join(pkgs)} by hand", file=sys.stderr)
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(pkgs)} ...", file=sys.stderr, flush=True)
    return subprocess.run([apt, "install", "-y", "-q", *pkgs], env=env, timeout=900).returncode

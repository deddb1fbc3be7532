"""Confining user paths to a docroot.

Every path a client names is resolved against the user's docroot: ``..``
components are refused outright (not normalised away, so a mistake is
reported rather than silently re-targeted), and the real path of the deepest
existing ancestor must stay inside the docroot, so a symlink inside the
docroot cannot lead a read or a write outside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from transport.errors import ErrorKind, PathError


def split_urlpath(urlpath: str) -> list[str]:
    """Components of a (percent-decoded) URL path; refuses ``..`` and NUL."""
    if "\x00" in urlpath:
        raise PathError("path contains a NUL byte", kind=ErrorKind.BAD_REQUEST)
    parts = [p for p in urlpath.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise PathError(f"path {urlpath!r} escapes the docroot ('..' is not allowed)")
    return parts


def confine(docroot: Path, path: Path, *, within: str = "the docroot") -> Path:
    """Raise ``PathError`` unless ``path`` resolves (through symlinks) inside ``docroot``.

    The deepest part of ``path`` that exists is resolved with ``realpath``; the
    rest will be created as plain folders and files. ``within`` names the root
    in the message (a client confines a download to "the destination").
    """
    root = Path(os.path.realpath(docroot))
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    real = Path(os.path.realpath(probe))
    if real != root and root not in real.parents:
        raise PathError(f"{_show(docroot, path)}: refused, it leads outside {within}")
    return path


def urlpath_of(raw_path: str) -> str:
    """Decode a raw (still percent-encoded) URL path the way file names are carried.

    Percent-escapes that are not UTF-8 (``%FF``) become the bytes they encode
    (PEP 383 ``surrogateescape``, as ``os.fsdecode`` gives them), so a plain PUT
    or GET of a non-UTF-8 name reaches the same file as the control API, never
    a file literally named ``%FF``. aiohttp's own decoding keeps such escapes.
    Returns the path after its leading '/', as the route's ``{path}`` holds it.
    """
    return unquote(raw_path, errors="surrogateescape").removeprefix("/")


def resolve(docroot: Path, urlpath: str) -> Path:
    """The absolute path for ``urlpath`` inside ``docroot``, confined."""
    parts = split_urlpath(urlpath)
    return confine(docroot, docroot.joinpath(*parts))


def file_in_the_way(docroot: Path, target: Path) -> str:
    """The message for ``target`` below a file that stands where a folder is meant:
    ``/afile.txt: a file, not a folder (cannot write /afile.txt/x.bin)``."""
    above = target.parent
    while above != docroot and above.parent != above and not above.is_file():
        above = above.parent
    if not above.is_file():
        return f"{relpath_in(docroot, target)}: a file is in the way of its folder"
    return (f"{relpath_in(docroot, above)}: a file, not a folder "
            f"(cannot write {relpath_in(docroot, target)})")


def relpath_in(docroot: Path, path: Path) -> str:
    """``path`` relative to ``docroot``, '/'-separated, for messages and logs."""
    try:
        rel = path.relative_to(docroot).as_posix()
    except ValueError:
        return path.name
    # Only the docroot itself is "."; a leading dot in a name (".hidden") is kept.
    return "/" if rel == "." else "/" + rel


SERVER_FULL_NOTE = ("the partial stays on the server for a resume: free space there, then "
                    "run again")
"""Appended to a server-side "No space left on device" (or quota) error of a file being
received: its partial is kept (it resumes once there is room), and says so."""


def server_name(docroot: Path, path: Path) -> str:
    """How the daemon names one of its own files in an error it sends a client:
    ``server: x/b.bin`` (the path from the docroot's top), so that a server-side I/O error
    never reads as the client's own. Its state folder's files are not named."""
    rel = relpath_in(docroot, path).lstrip("/")
    if not rel or rel.split("/")[0] == ".fallback":
        return "server"
    return f"server: {rel}"


def server_os_message(exc: OSError, docroot: Path | None) -> str:
    """One line for an ``OSError`` the daemon met in its file system (``server_name``)."""
    why = exc.strerror or str(exc)
    name = "server"
    if exc.filename and docroot is not None:
        name = server_name(docroot, Path(os.fsdecode(exc.filename)))
    return f"{name}: {why}"


def _show(docroot: Path, path: Path) -> str:
    return relpath_in(docroot, path) or "/"

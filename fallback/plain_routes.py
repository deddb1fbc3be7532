"""Plain HTTP for curl, aria2c and browsers: ``GET|HEAD /path`` with ranges (RFC 9110,
``fallback.plainhttp``) and ``PUT /path``, with Basic auth."""

from __future__ import annotations

import asyncio
import functools
import os
import stat
import time
from pathlib import Path

from aiohttp import web

from fallback import plainhttp
from fallback.daemonctx import (
    authenticate,
    docroot_state,
    refuse_reserved,
    state_of,
)
from fallback.paths import file_in_the_way, relpath_in, resolve, split_urlpath, urlpath_of
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import file_mode
from transport.blocks.receiver import FileReceiver
from transport.blocks.statedir import STATE_DIR, StateDir, is_state_dir
from transport.errors import (
    ConflictError,
    ErrorKind,
    PathError,
    ProtocolError,
)


# -- plain HTTP: GET/HEAD with Range, PUT ----------------------------------------------------------
async def plain_get(request: web.Request) -> web.StreamResponse:
    user = await authenticate(request)
    if not user.read_allowed:
        raise PathError(f"user {user.name} may not read")
    docroot = Path(user.docroot)
    path = resolve(docroot, urlpath_of(request.rel_url.raw_path))
    refuse_reserved(request, docroot, path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # /file.txt/x: a file where a folder would be
        raise PathError(f"{relpath_in(docroot, path)}: no such file", kind=ErrorKind.NOT_FOUND) from None
    if stat.S_ISDIR(st.st_mode):
        names = [n for n in sorted(os.listdir(path)) if not _hidden(request, docroot, path, n)]
        return web.json_response({"folder": relpath_in(docroot, path), "entries": names})
    return await plainhttp.serve_file(request, str(path), label=relpath_in(docroot, path),
                                      executor=state_of(request).executor)


def _hidden(request: web.Request, docroot: Path, folder: Path, name: str) -> bool:
    """A listing leaves out the docroot's state folder, and any state folder of ours (the
    rule of ``walk_source``, so a listing shows what a download of the folder brings)."""
    if name != STATE_DIR:
        return False
    return is_state_dir(folder / name) or docroot_state(request, docroot).holds(folder / name)


async def plain_put(request: web.Request) -> web.Response:
    """A whole-file upload (``curl -T``): streamed into a partial file, renamed when complete."""
    user = await authenticate(request)
    if not user.write_allowed:
        raise PathError(f"user {user.name} may not write")
    if state_of(request).config.content_protection_required:
        # A PUT body is stored as it comes: plaintext (a trial stored one with curl -T).
        raise PathError("Server requires content protection: a plain PUT would store "
                        "plaintext; upload with fallback --encrypt", kind=ErrorKind.FORBIDDEN)
    docroot = Path(user.docroot)
    parts = split_urlpath(urlpath_of(request.rel_url.raw_path))
    if not parts:
        raise PathError("PUT needs a file name", kind=ErrorKind.BAD_REQUEST)
    target = resolve(docroot, urlpath_of(request.rel_url.raw_path))
    if parts[0] == STATE_DIR:
        raise PathError("that name is reserved", kind=ErrorKind.FORBIDDEN)
    refuse_reserved(request, docroot, target)  # e.g. through a symlink to it
    if target.is_dir():
        raise ConflictError(f"{relpath_in(docroot, target)}: is a folder")
    existed = target.exists()
    if existed and state_of(request).config.overwrite == "deny":
        raise ConflictError(f"{relpath_in(docroot, target)}: exists and the server does not overwrite")
    await plainhttp.check_put(request, str(target), label=relpath_in(docroot, target),
                              executor=state_of(request).executor)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConflictError(file_in_the_way(docroot, target)) from None
    await _receive_plain(request, target, docroot_state(request, docroot))
    return web.json_response({"path": relpath_in(docroot, target)}, status=204 if existed else 201)


async def _receive_plain(request: web.Request, target: Path, state: StateDir) -> None:
    st = state_of(request)
    size = request.content_length
    entry = FileEntry("", "file", size=size if size is not None else 0,
                      mtime_ns=time.time_ns(), mode=0o644, block_size=st.config.block_size)
    loop = asyncio.get_running_loop()
    # An unknown length (chunked PUT) is written sequentially; the receiver is
    # still used so the file appears atomically and a lock guards the target.
    rec = await loop.run_in_executor(st.executor, lambda: FileReceiver(
        target, entry, resume=False, fsync=st.config.fsync, state=state))
    try:
        fd = os.open(rec.partial, os.O_WRONLY | os.O_CLOEXEC)
        written = 0
        try:
            async for chunk in request.content.iter_any():
                await loop.run_in_executor(st.executor, os.pwrite, fd, chunk, written)
                written += len(chunk)
            await loop.run_in_executor(st.executor, os.fsync, fd) if st.config.fsync else None
        finally:
            os.close(fd)
        if size is not None and written != size:
            raise ProtocolError(f"body ended after {written} of {size} bytes")
        os.utime(rec.partial)
        os.chmod(rec.partial, file_mode(0o644))  # the daemon's umask applies
        await loop.run_in_executor(st.executor, functools.partial(
            state.publish, rec.partial, target, replace=True))  # a copy when cross-device
        rec.discard()
    except BaseException:
        rec.discard()
        raise



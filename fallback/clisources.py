"""What ``fallback transfer``'s positional arguments become: one transfer per source.

As scp, cp and ascp take them: ``SRC... DST`` (what a shell glob produces), plus the
sources of ``--file-list FILE`` (one a line, as ``ascp --file-list``). Every source is
local and DST a URL (an upload), or every source a URL and DST local (a download);
with more than one source DST is a folder (created when it is missing, its last level
only). ``--src-base PREFIX`` keeps each source's path below PREFIX at the destination
(as ``ascp --src-base``). ``-`` stands for standard input (a single source; DST must
name the file) or standard output (DST of a single remote file). ``-P PORT`` replaces
the port of every URL. The results of the runs are merged into one (``merge``).
"""

from __future__ import annotations

import os
import posixpath
import select
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fallback.errors import TransferError, UsageError
from fallback.remote import is_url, parse_url, redacted
from fallback.result import TransferResult

STDIO = "-"

__all__ = ["STDIO", "Job", "merge", "plan_jobs", "spool_stdin", "with_port"]


@dataclass(frozen=True, slots=True)
class Job:
    """One transfer: ``src`` to ``dst`` (strings as ``transfer()`` takes them); ``prefix``
    is the folder part kept by ``--src-base`` (``""`` without), for the result's names."""

    src: str
    dst: str
    prefix: str = ""


def with_port(url: str, port: int | None) -> str:
    """``url`` with its port replaced by ``port`` (``-P``); unchanged for None or a path."""
    if port is None or not is_url(url):
        return url
    u = urlsplit(url)
    userinfo, _, _ = u.netloc.rpartition("@")
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def read_file_list(path: str) -> list[str]:
    """``--file-list FILE``: one source a line (empty lines ignored; ``-``: standard input)."""
    try:
        if path == STDIO:
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
    except OSError as exc:
        raise UsageError(f"--file-list {path}: {exc.strerror or exc}") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _url_dir(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _rel_under(path: str, base: str, what: str) -> str:
    """The folder part of ``path`` below ``base`` (``"a/b"``), for ``--src-base``."""
    rel = posixpath.relpath(posixpath.dirname(path.rstrip("/")) or "/", base)
    if rel == ".":
        return ""
    if rel == ".." or rel.startswith("../"):
        raise UsageError(f"--src-base {base}: {what} {path} is not below it")
    return rel


def plan_jobs(sources: list[str], dst: str, src_base: str | None = None) -> list[Job]:
    """The transfers ``SRC... DST`` stands for; ``UsageError`` for a mix that cannot be."""
    if not sources:
        raise UsageError("no source given: fallback transfer SRC... DST (or --file-list FILE DST)")
    if "" in sources:  # "" would be the current folder (a shell's unset $FILE): cp '' refuses
        raise UsageError("a source is empty (''): name a file, a folder or a URL")
    if not dst:
        raise UsageError("the destination is empty (''): name a folder, a file or a URL "
                         "(. for the current folder)")
    if STDIO in sources and len(sources) > 1:
        raise UsageError("- (standard input) must be the only source")
    remote_src = [s for s in sources if is_url(s)]
    if remote_src and len(remote_src) != len(sources):
        raise UsageError("the sources mix URLs and local paths: all sources must be local "
                         "(an upload) or all URLs (a download)")
    if remote_src and is_url(dst):
        raise UsageError("both ends are URLs: one end must be a local path")
    daemons = {(u.host, u.port, u.user) for u in map(parse_url, remote_src)}
    if len(daemons) > 1:
        raise UsageError("the sources name different daemons or users: one command per "
                         "daemon and user")
    if not remote_src and not is_url(dst):
        raise UsageError("neither end is a URL: one end must be http(s)://[user@]host[:port]/path")
    if dst == STDIO:
        if len(sources) > 1:
            raise UsageError("- (standard output) takes exactly one remote file")
        return [Job(sources[0], dst)]
    if sources == [STDIO]:
        if dst.endswith("/"):
            raise UsageError("with - (standard input) as the source, DST must name the file "
                             "to create (https://host/dir/name), not a folder")
        return [Job(STDIO, dst)]
    many = len(sources) > 1 or src_base is not None
    jobs = []
    landed: dict[tuple[str, str], str] = {}  # (prefix, name at DST) -> the source landing there
    for s in sources:
        if not many:
            jobs.append(Job(s, dst))
            continue
        if src_base is None:
            prefix = ""
        elif remote_src:
            prefix = _rel_under(parse_url(s).path, "/" + src_base.strip("/"), "source")
        else:
            prefix = _rel_under(os.path.abspath(s), os.path.abspath(src_base), "source")
        if is_url(dst):
            base = _url_dir(dst)
            target = base + "/".join(quote(p, safe="") for p in prefix.split("/")) + "/" \
                if prefix else base
        else:
            target = os.path.join(dst, *prefix.split("/"), "") if prefix else \
                os.path.join(dst, "")
        name = (prefix, _landing_name(s))
        if name in landed:
            first = landed[name]
            shown = "/".join(x for x in name if x)
            raise UsageError(f"{redacted(first)} is given twice" if first == s else
                             f"{redacted(first)} and {redacted(s)} would both land as {shown} "
                             "in the destination (the second would overwrite the first): "
                             "rename one or copy them in separate commands")
        landed[name] = s
        jobs.append(Job(s, target, prefix))
    return jobs


def _landing_name(src: str) -> str:
    """The name a source gets in the destination folder: its last path segment."""
    if is_url(src):
        return parse_url(src).path.rstrip("/").rpartition("/")[2]  # decoded already
    return os.path.basename(os.path.abspath(src))


def remote_name(dst_url: str) -> str:
    """The file name a ``-`` upload stores under: DST's last path segment."""
    name = unquote(urlsplit(dst_url).path.rstrip("/").rpartition("/")[2],
                   errors="surrogateescape")
    if not name:
        raise UsageError("with - (standard input) as the source, DST must name the file")
    return name


@contextmanager
def spool_stdin(dst_url: str, stream: BinaryIO) -> Iterator[tuple[str, str]]:
    """Standard input copied into a temporary file named as DST's last segment; yields
    (the file to upload, DST's folder URL). The spool is removed afterwards."""
    name = remote_name(dst_url)
    folder = dst_url[: len(dst_url.rstrip("/")) - len(dst_url.rstrip("/").rpartition("/")[2])]
    with tempfile.TemporaryDirectory(prefix="fallback-stdin-") as tmp:
        path = Path(tmp) / name
        try:
            with open(path, "wb") as f:
                while True:  # raw stdin (PYTHONUNBUFFERED) may say None: not yet, not EOF
                    chunk = stream.read(1 << 20)
                    if chunk is None:
                        select.select([stream], [], [])
                        continue
                    if not chunk:
                        break
                    f.write(chunk)
        except OSError as exc:  # e.g. ENOSPC: TMPDIR names where the spool goes
            raise TransferError(f"standard input: cannot keep it in {tempfile.gettempdir()} "
                                f"(set TMPDIR to another folder): {exc.strerror or exc}") from None
        yield str(path), folder


@contextmanager
def stdout_target() -> Iterator[str]:
    """A temporary folder a ``-`` download lands in (verified there) before it is copied to
    standard output; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fallback-stdout-") as tmp:
        yield tmp + os.sep


def copy_to_stdout(folder: str, out: BinaryIO) -> None:
    """Write the one file a ``-`` download put in ``folder`` to ``out``, every byte.

    Written to ``out``'s descriptor with a loop over short writes: under
    ``PYTHONUNBUFFERED=1`` ``sys.stdout.buffer`` is a raw ``FileIO`` whose ``write`` may
    take 64 KiB of a 1 MiB chunk into a pipe, and ``shutil.copyfileobj`` drops the rest
    (a trial lost 1 MB of 9 MB, exit 0, "verified in full"). A non-blocking descriptor
    is waited on (``select``), never skipped."""
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    if len(files) != 1:
        raise UsageError("- (standard output) takes one remote file, not a folder")
    out.flush()
    fd = out.fileno()
    with open(files[0], "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while n := f.readinto(buf):
            write_all(fd, memoryview(buf)[:n])


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (short writes continued, ``EAGAIN`` waited out)."""
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        data = data[n:]


def _keyed(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}/{k}" if prefix else k: v for k, v in d.items()}


def _names(error: str, src: str) -> bool:
    """Whether ``error`` names the local source already (``nope.txt: no such file or
    folder``): then it is not prefixed with it a second time. A URL source keeps its prefix
    (the daemon names its path from the docroot's top: ``remote /in/x: not found``)."""
    if is_url(src):
        return False
    return any(error.startswith(f"{p}: ") for p in (src, src.rstrip("/"), os.path.abspath(src)))


def merge(parts: list[tuple[Job, TransferResult]], seconds: float) -> TransferResult:
    """One result for several runs: counts summed, maps joined (names keep the
    ``--src-base`` folder), ``verified`` the weakest, ``seconds`` the wall time of all."""
    if len(parts) == 1:
        return parts[0][1]
    out = TransferResult(ok=all(r.ok for _, r in parts), direction=parts[0][1].direction,
                         seconds=seconds, dry_run=parts[0][1].dry_run)
    offset = 0.0  # each part's switches, on the merged run's clock (parts run one by one)
    resolved = 0.0
    for job, r in parts:
        for t in r.transports:
            if t not in out.transports:
                out.transports.append(t)
        out.files += r.files
        out.bytes += r.bytes
        out.sent_bytes += r.sent_bytes
        out.skipped_bytes += r.skipped_bytes
        # The UDP and path figures (every one was lost beyond the first source, trial):
        out.hole_bytes += r.hole_bytes
        out.retransmitted_bytes += r.retransmitted_bytes
        out.retries += r.retries
        if r.sent_bytes and r.loss_pct:  # weighted by the bytes each part carried
            out.loss_pct = (out.loss_pct * resolved + r.loss_pct * r.sent_bytes) / (
                resolved + r.sent_bytes)
            resolved += r.sent_bytes
        out.rtt_ms = r.rtt_ms or out.rtt_ms
        out.datagram_size = r.datagram_size or out.datagram_size
        out.transport_reason = out.transport_reason or r.transport_reason
        out.udp_reason = r.udp_reason or out.udp_reason
        out.proxy = out.proxy or r.proxy
        out.switches.extend(replace(sw, at=sw.at + offset) for sw in r.switches)
        offset += r.seconds
        out.checksums.update(_keyed(r.checksums, job.prefix))
        out.skipped_files.update(_keyed(r.skipped_files, job.prefix))
        out.content.update(_keyed(r.content, job.prefix))
        out.stored_as.update(_keyed(r.stored_as, job.prefix))
        for k, level in _keyed(r.verified_files, job.prefix).items():
            out.mark_verified(k, level)
        out.would_transfer.extend(f"{job.prefix}/{k}" if job.prefix else k
                                  for k in r.would_transfer)
        out.removed.extend(f"{job.prefix}/{k}" if job.prefix else k for k in r.removed)
        out.block_sizes.update(_keyed(r.block_sizes, job.prefix))
        if r.block_size and not out.block_size:
            out.block_size = r.block_size
        elif r.block_size and r.block_size != out.block_size:  # this part's files differ
            out.block_sizes.update({k: r.block_size for k in _keyed(r.checksums, job.prefix)})
        if r.error and out.error is None:
            out.error = r.error if _names(r.error, job.src) else f"{redacted(job.src)}: {r.error}"
    return out

"""The transfer engine: plan, stream, commit, in both directions over HTTP(S).

The client is the planner in both directions: it sees the source and the
receiver's state (its own for downloads, the daemon's for uploads), applies
the overwrite policy and the resume check (``transport.blocks.plan``), then
moves exactly the blocks still missing over N parallel streams, and loops
until the receiver has everything (a stream that dies only costs its blocks
in flight). The UDP path (#4) will plug in here as another way to drain the
same ``BlockFeed`` / fill the same ``BlockSink``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fallback.answers import (
    commit_results,
    confine_download,
    digests_answer,
    download_answer,
    plain_name,
    planned_missing,
    planned_refused,
    streams_cap,
    upload_states,
)
from fallback.control import MAX_RANGES
from fallback.errors import TransferError, UsageError
from fallback.remote import Remote, Url, is_url, parse_url
from fallback.result import Progress, ProgressCallback, TransferResult
from transport.blocks import envelope as env
from transport.blocks.digest import digest_path, file_digest
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import dir_mode
from transport.blocks.plan import (
    DEFAULT_RESUME,
    OVERWRITE_MODES,
    RESUME_MODES,
    TargetState,
    batches,
    overwrite_action,
    resumable,
    resume_ok,
    resume_samples,
    trusted_blocks,
)
from transport.blocks.ranges import RangeSet
from transport.blocks.receiver import FileReceiver, inspect_partial
from transport.blocks.session import BlockFeed, BlockSink
from transport.blocks.source import FileSource
from transport.blocks.statedir import StateDir, in_state_dir
from transport.blocks.transform import BlockTransform
from transport.blocks.tree import target_for, walk_source
from transport.errors import (
    BadPassphrase,
    ConnectionLost,
    IntegrityError,
    PathError,
    ProtocolError,
    TransportError,
)
from transport.http.client import download_stream, upload_stream

MAX_ROUNDS = 6
DIGEST_BATCH = 32
"""Blocks per ``/digests`` call; the daemon reads at most 64 MiB per call (its
``MAX_DIGEST_BYTES``) and leaves the rest out of its answer, which the client asks
for again, so no call nears the client's read timeout."""

log = logging.getLogger("fallback.client")  # -v: info, -vv: debug (fallback.cli)


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


async def transfer_async(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                         options: Options | None = None,
                         progress: ProgressCallback | None = None) -> TransferResult:
    """Copy ``src`` to ``dst``; one of them is a daemon URL. Raises ``TransferError``."""
    opts = options or Options()
    opts.check()
    s, d = os.fspath(src), os.fspath(dst)
    if is_url(s) and is_url(d):
        raise UsageError("both ends are URLs: one end must be a local path")
    if not is_url(s) and not is_url(d):
        raise UsageError("neither end is a URL: one end must be http(s)://[user@]host[:port]/path")
    if opts.encrypt and is_url(s):
        raise UsageError("--encrypt applies to uploads; use --decrypt to download")
    url = parse_url(d if is_url(d) else s)
    result = TransferResult(direction="upload" if is_url(d) else "download")
    t0 = time.monotonic()
    executor = ThreadPoolExecutor(max(4, opts.streams + 2), "fb-client")
    remote: Remote | None = None
    try:
        remote = await Remote.connect(
            url, transport=opts.transport, user=opts.user, password=opts.password,
            cacert=opts.cacert, fingerprint=opts.fingerprint, insecure=opts.insecure,
            streams=opts.streams)
        result.transports.append(remote.scheme)
        if result.direction == "upload":
            await _upload(remote, Path(s), url, opts, executor, result, progress)
        else:
            await _download(remote, url, Path(d), d.endswith(("/", os.sep)), opts, executor,
                            result, progress)
        result.ok = True
    except TransportError as exc:
        result.error = exc.message
        raise TransferError(exc.message, status=exc.status, result=result) from None
    except (OSError, UsageError) as exc:
        if isinstance(exc, UsageError):
            raise
        result.error = f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}".lstrip(": ")
        raise TransferError(result.error, result=result) from None
    finally:
        result.seconds = time.monotonic() - t0
        if remote is not None:
            await remote.close(result.error)
        executor.shutdown(wait=False)
    return result


# -- upload ------------------------------------------------------------------------------------------
async def _upload(remote: Remote, src: Path, url: Url, opts: Options, executor: ThreadPoolExecutor,
                  result: TransferResult, progress_cb: ProgressCallback | None) -> None:
    loop = asyncio.get_running_loop()
    tree = await loop.run_in_executor(executor, walk_source, src, opts.block_size)
    name = src.resolve().name
    for why in tree.skipped:  # special files, unreadable folders: reported, the rest goes on
        rel, _, reason = why.partition(": ")
        result.skipped_files[_shown(name, rel)] = reason
    entries = list(tree.entries)
    if opts.encrypt:
        entries = [_encrypted_placeholder(e) for e in entries]
    files = [i for i, e in enumerate(entries) if not e.is_dir]
    result.files = len(files)
    result.bytes = sum(entries[i].size for i in files)
    opened = await remote.open({
        "direction": "upload", "path": url.path, "into_dir": url.into_dir,
        "name": name + (env.SUFFIX if opts.encrypt and not entries[0].is_dir else ""),
        "entries": [e.to_json() for e in entries], "overwrite": opts.overwrite,
        "encrypt": opts.encrypt,
        "strong_pass": bool(opts.encrypt and opts.passphrase and strong_passphrase(opts.passphrase)),
    })
    states = upload_states(opened, len(entries))
    streams = max(1, min(opts.streams, streams_cap(opened) or opts.streams))
    log.info("%d streams (asked %d, the daemon allows %s)", streams, opts.streams,
             streams_cap(opened) or "any")
    progress = Progress(result.bytes, remote.scheme, progress_cb)
    sources: dict[int, FileSource] = {}
    actions: dict[int, dict[str, Any]] = {}
    plain_roots: dict[int, str] = {}
    trusted: dict[int, set[int]] = {}  # journaled blocks kept without comparing them with the source
    reads: set[asyncio.Task[Any]] = set()
    try:
        for i in files:
            entry, state = entries[i], states[i]
            shown = _shown(name, tree.entries[i].path)
            result.content[shown] = "envelope" if opts.encrypt else "plain"
            path = tree.paths[i]
            transform: BlockTransform | None = None
            if opts.encrypt:
                assert opts.passphrase is not None
                entry, transform = await loop.run_in_executor(
                    executor, _encrypted_entry, entry, state, opts.passphrase)
                entries[i] = entry
            action = overwrite_action(entry, state, opts.overwrite)
            if action == "compare":
                local = await loop.run_in_executor(executor, digest_path, path, entry.block_size)
                action = "skip" if local == state.root else "transfer"
                if action == "skip":
                    result.checksums[shown] = local
            if action == "skip":
                result.skipped_files[shown] = "exists" if opts.overwrite != "diff" else "unchanged"
                progress.skip(entry.size)
                actions[i] = {"file": i, "action": "skip"}
                continue
            src_file = await loop.run_in_executor(
                executor, functools.partial(FileSource, path, entry, encode=transform))
            sources[i] = src_file
            resume = False
            if resumable(entry, state) and opts.resume != "none":
                samples = resume_samples(state.have, opts.resume)
                fresh = {b: (await loop.run_in_executor(executor, src_file.read_block, b))[1]
                         for b in samples}
                resume = resume_ok(opts.resume, entry, state, fresh)
            trusted[i] = trusted_blocks(state.have, opts.resume) if resume else set()
            actions[i] = {"file": i, "action": "resume" if resume else "fresh",
                          "entry": entry.to_json()}
        planned = await remote.call("POST", remote.session_url("/plan"),
                                    {"files": list(actions.values())})
        counts = {i: s.layout.count for i, s in sources.items()}
        missing = planned_missing(planned, counts)
        for k, why in planned_refused(planned, counts).items():
            # The server's overwrite=deny kept an existing target: skipped, with its reason.
            sources.pop(k).close()
            missing.pop(k, None)
            shown = _shown(name, tree.entries[k].path)
            result.skipped_files[shown] = f"refused by the server: {why}"
            progress.skip(entries[k].size)
        feed = BlockFeed(sources, executor)
        kept: dict[int, set[int]] = {}  # blocks counted as skipped (held by the daemon)
        for i, blocks in missing.items():
            have = blocks.complement(0, sources[i].layout.count)
            kept[i] = set(have.members())
            progress.skip(_plain_bytes(entries[i], have))
            feed.add_ranges([(i, a, b) for a, b in blocks])
        digests: dict[int, dict[int, bytes]] = {i: dict(states[i].have) for i in sources}
        for i, blocks in missing.items():
            # The daemon may hold blocks it had not journaled yet when it reported its state
            # (the last records of a session it took over): digest those from the source, or
            # the whole-file digest at commit misses them and the partial is thrown away.
            have = blocks.complement(0, sources[i].layout.count)
            unseen = [b for b in have.members() if b not in digests[i]]
            for b in unseen:
                digests[i][b] = (await loop.run_in_executor(executor, sources[i].read_block, b))[1]
            trusted[i] -= set(unseen)
        feed.on_progress = lambda f, n: progress.carry(_plain_share(entries[f], n),
                                                       _shown(name, entries[f].path))
        _record_digests(feed, digests, reads, trusted)
        rounds = 0
        while True:
            if feed.pending:
                await _run_streams(lambda: upload_stream(
                    remote.http, remote.session_url("/blocks"), feed,
                    headers=remote.stream_headers, ssl=remote.ssl), streams, feed)
            roots = {i: file_digest(entries[i].block_size, entries[i].size,
                                    (digests[i].get(b, b"") for b in range(sources[i].layout.count)))
                     for i in sources}
            for s in sources.values():
                s.check_unchanged()
            committed = await remote.call("POST", remote.session_url("/commit"), {
                "files": [{"file": i, "root": roots[i]} for i in sources if i not in plain_roots]})
            again: list[tuple[int, int, int]] = []
            verifying = False
            results = commit_results(committed, {i: s.layout.count for i, s in sources.items()})
            for i, r in results.items():
                if "error" in r:
                    raise TransportError(r["error"], status=int(r.get("status", 500)))
                if r.get("ok"):
                    plain_roots[i] = r["root"]
                    shown = _shown(name, tree.entries[i].path)
                    result.checksums[shown] = r["root"] if not opts.encrypt else \
                        await loop.run_in_executor(executor, sources[i].plain_root)
                    result.mark_verified(shown, "sampled" if trusted.get(i) else "full")
                elif r.get("verifying"):
                    verifying = True  # the daemon is still re-reading its partial: ask again
                else:
                    dropped = r["missing"]
                    again.extend((i, a, b) for a, b in dropped)
                    for b in [b for b in kept.get(i, set()) if b in dropped]:  # dropped at the daemon
                        kept[i].discard(b)
                        progress.unskip(_plain_len(entries[i], b))
            if not again:
                if verifying:
                    continue
                break
            rounds += 1
            if rounds >= MAX_ROUNDS:
                raise ConnectionLost(f"{sum(b - a for _, a, b in again)} blocks still missing "
                                     f"after {rounds} rounds")
            log.info("retry round %d: the daemon still misses %d blocks", rounds,
                     sum(b - a for _, a, b in again))
            feed.add_ranges(again)
        progress.finish()
    finally:
        result.sent_bytes = progress.carried  # also when failing: what this run did move
        result.skipped_bytes = progress.skipped
        running = reads - {asyncio.current_task()}
        if running:  # a dead stream may leave a read-ahead running: let it end before closing
            await asyncio.wait(running)
        for s in sources.values():
            s.close()


def _encrypted_placeholder(entry: FileEntry) -> FileEntry:
    """Open-time entry: the daemon reports its partial's header, so a resume can reuse the salt."""
    if entry.is_dir:
        return entry
    return FileEntry(entry.path + env.SUFFIX if entry.path else "", "file", size=entry.size,
                     mtime_ns=entry.mtime_ns, mode=entry.mode, block_size=entry.block_size,
                     transform="envelope-v1", overhead=env.OVERHEAD)


def _encrypted_entry(entry: FileEntry, state: TargetState,
                     passphrase: str) -> tuple[FileEntry, BlockTransform]:
    """The envelope for one file: the partial's header when it is ours to resume, else a new one."""
    j = state.journal
    if j and j[:4] == [entry.size, entry.mtime_ns, entry.block_size, "envelope-v1"] and j[4]:
        try:
            t = env.EnvelopeTransform.open(passphrase, bytes.fromhex(str(j[4])))
            return _with_header(entry, t), t
        except (TransportError, ValueError):
            pass  # another passphrase or a damaged header: start this file over
    t = env.EnvelopeTransform.for_upload(passphrase, entry.size, entry.block_size)
    return _with_header(entry, t), t


def _with_header(entry: FileEntry, t: BlockTransform) -> FileEntry:
    return FileEntry(entry.path, "file", size=entry.size, mtime_ns=entry.mtime_ns, mode=entry.mode,
                     block_size=entry.block_size, header=t.header, overhead=t.overhead,
                     transform=t.name)


def _record_digests(feed: BlockFeed, digests: dict[int, dict[int, bytes]],
                    reads: set[asyncio.Task[Any]], trusted: dict[int, set[int]]) -> None:
    """Remember each block's digest as it is read, for the whole-file digest at commit
    (a block read from the source is no longer one trusted from the journal).

    Reads run as tasks (a stream reads one block ahead); ``reads`` holds those
    still running, and an error of one that nobody awaits any more (its stream
    died) is taken here instead of surfacing as an asyncio traceback.
    """
    original = feed.read

    def settled(task: asyncio.Task[Any]) -> None:
        reads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the stream that wanted it has already failed

    async def read(item: tuple[int, int]) -> tuple[bytes | bytearray, bytes]:
        task = asyncio.current_task()
        if task is not None and task not in reads:
            reads.add(task)
            task.add_done_callback(settled)
        data, d = await original(item)
        digests[item[0]][item[1]] = d
        trusted.get(item[0], set()).discard(item[1])
        return data, d

    feed.read = read  # type: ignore[method-assign]


# -- download ----------------------------------------------------------------------------------------
async def _download(remote: Remote, url: Url, dst: Path, into: bool, opts: Options,
                    executor: ThreadPoolExecutor, result: TransferResult,
                    progress_cb: ProgressCallback | None) -> None:
    loop = asyncio.get_running_loop()
    opened = await remote.open({"direction": "download", "path": url.path})
    answer = download_answer(opened)  # the daemon's names and sizes, checked before any use
    entries, name = answer.entries, answer.name
    for why in answer.skipped:  # e.g. symlinks leading out of the docroot
        rel, _, reason = why.partition(": ")
        result.skipped_files[_shown(name, rel)] = reason or "skipped by the daemon"
    files = [i for i, e in enumerate(entries) if not e.is_dir]
    streams = max(1, min(opts.streams, answer.streams_max or opts.streams))
    log.info("%d streams (asked %d, the daemon allows %s)", streams, opts.streams,
             answer.streams_max or "any")
    root = dst / name if (into or dst.is_dir()) else dst
    anchor = root.parent  # the folder the user named, or the one the named root goes in
    if entries[0].is_dir is False and root.is_dir():
        root = root / name
    # Partials and journals go to the state folder at the top of the destination folder
    # (the one receiving the transfer root): same file system, never among the user's files.
    statedir = StateDir(root.parent)
    if statedir.holds(root) or in_state_dir(root.parent):
        raise PathError(f"{root}: would be in fallback's state folder (.fallback at the top of "
                        "a destination is reserved); choose another destination or name")
    result.files = len(files)
    result.bytes = sum(entries[i].size for i in files)
    progress = Progress(result.bytes, remote.scheme, progress_cb)
    transforms: dict[int, BlockTransform] = {}
    targets: dict[int, Path] = {}
    for i in files:
        e = entries[i]
        target = target_for(root, e.path)
        result.content[_display(name, e, False)] = "envelope" if e.header else "plain"
        if opts.decrypt and e.transform == "identity" and _shown(name, e.path).endswith(env.SUFFIX):
            # The daemon sends a file it cannot parse as an envelope (damaged header, wrong
            # length) as plain bytes; asked to decrypt it, say so instead of copying it silently.
            raise IntegrityError("File decryption error, damaged envelope or not an envelope: "
                                 f"{_shown(name, e.path)}")
        if e.transform == "envelope-v1" and opts.decrypt:
            assert opts.passphrase is not None
            try:
                transforms[i] = await loop.run_in_executor(
                    executor, env.EnvelopeTransform.open, opts.passphrase, e.header)
            except BadPassphrase:
                raise BadPassphrase(
                    f"File decryption error, bad passphrase: {_shown(name, e.path)}") from None
            del result.content[_display(name, e, False)]
            result.content[_display(name, e, True)] = "decrypted"
            target = target.with_name(plain_name(target.name, env.SUFFIX))
        targets[i] = target
    confine_download(anchor, [targets[i] if i in targets else target_for(root, e.path)
                              for i, e in enumerate(entries)])
    for e in entries:
        if e.is_dir:
            path = target_for(root, e.path)
            if path.exists() and not path.is_dir():
                raise TransportError(f"{path}: a file of that name exists", status=409)
            path.mkdir(parents=True, exist_ok=True)
    receivers: dict[int, FileReceiver] = {}
    sink = BlockSink(receivers, executor)
    try:
        for i in files:
            await _plan_download_file(remote, i, entries[i], targets[i], transforms.get(i), opts,
                                      executor, receivers, result, progress, name, statedir)
        sink.on_progress = lambda f, n: progress.carry(_plain_share(entries[f], n),
                                                       _shown(name, entries[f].path))
        rounds = 0
        while True:
            want = [[i, a, b] for i, r in receivers.items() for a, b in r.missing()]
            if not want:
                break
            if rounds >= MAX_ROUNDS:
                raise ConnectionLost(f"blocks still missing after {rounds} rounds")
            if rounds:
                log.info("retry round %d: %d blocks still missing", rounds,
                         sum(b - a for _, a, b in want))
            rounds += 1
            for k in range(0, len(want), MAX_RANGES):  # the daemon takes that many per call
                await remote.call("POST", remote.session_url("/want"),
                                  {"blocks": want[k:k + MAX_RANGES]})
            await _run_streams(lambda: download_stream(
                remote.http, remote.session_url("/blocks"), sink,
                headers=remote.stream_headers, ssl=remote.ssl), streams, None)
        await sink.flush()
        failed = await _commit_downloads(remote, receivers, entries, targets, transforms, name,
                                         executor, result)
        if failed:
            raise failed[0] if len(failed) == 1 else IntegrityError(
                f"{len(failed)} files failed their final check, e.g. {failed[0].message}")
        for i in reversed(range(len(entries))):
            if entries[i].is_dir:
                path = target_for(root, entries[i].path)
                os.chmod(path, dir_mode(entries[i].mode))  # no set-id/sticky; umask applies
                os.utime(path, ns=(entries[i].mtime_ns, entries[i].mtime_ns))
        progress.finish()
    finally:
        result.sent_bytes = progress.carried  # also when failing: what this run did move
        result.skipped_bytes = progress.skipped
        await sink.close()  # checkpoints what is left, keeping partials for a resume
        try:
            await loop.run_in_executor(executor, statedir.tidy)  # gone unless partials are left
        except OSError:
            pass  # an empty state folder left behind is harmless


async def _plan_download_file(remote: Remote, i: int, entry: FileEntry, target: Path,
                              transform: BlockTransform | None, opts: Options,
                              executor: ThreadPoolExecutor, receivers: dict[int, FileReceiver],
                              result: TransferResult, progress: Progress, name: str,
                              statedir: StateDir) -> None:
    loop = asyncio.get_running_loop()
    shown = _shown(name, entry.path)
    decoded = transform is not None
    partial = await loop.run_in_executor(
        executor, lambda: inspect_partial(target, decoded=decoded, state=statedir))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    state = TargetState(exists=st is not None, is_dir=target.is_dir(),
                        size=st.st_size if st else 0, mtime_ns=st.st_mtime_ns if st else 0,
                        journal=partial.identity, have=partial.have)
    compare_entry = entry if not decoded else FileEntry(entry.path, "file", size=entry.size,
                                                        mtime_ns=entry.mtime_ns,
                                                        block_size=entry.block_size)
    action = overwrite_action(compare_entry, state, opts.overwrite)
    if action == "compare":
        if decoded or entry.header:
            action = "transfer"  # ciphertext and plaintext digests are not comparable
        else:
            local = await loop.run_in_executor(executor, digest_path, target, entry.block_size)
            action = "skip" if local == await _source_root(remote, i) else "transfer"
            if action == "skip":
                result.checksums[shown] = local
    if action == "skip":
        result.skipped_files[shown] = "exists" if opts.overwrite != "diff" else "unchanged"
        progress.skip(entry.size)
        return
    resume = False
    compared: set[int] = set()  # journaled blocks compared with the daemon's current bytes
    if resumable(entry, state) and opts.resume != "none":
        samples = resume_samples(state.have, opts.resume)
        fresh = await _source_digests(remote, i, samples)
        compared = set(samples)
        resume = resume_ok(opts.resume, entry, state, fresh)
    target.parent.mkdir(parents=True, exist_ok=True)
    rec = await loop.run_in_executor(executor, lambda: FileReceiver(
        target, entry, resume=resume, decode=transform, fsync=opts.fsync, state=statedir))
    receivers[i] = rec
    if rec.unverified:
        # Kept from an earlier run: the partial's bytes must still match the journal (read back
        # here, local), and the journal the daemon's current bytes (blocks the resume check did
        # not sample are compared now, so a stale partial costs only its changed blocks).
        await loop.run_in_executor(executor, rec.verify_carried)
        kept = rec.have()
        current = await _source_digests(remote, i, sorted(set(kept) - compared))
        stale = sorted(b for b, d in current.items() if kept.get(b) != d)
        await loop.run_in_executor(executor, rec.drop_blocks, stale)
    have = set(rec.have())
    progress.skip(sum(_plain_len(entry, b) for b in have))


async def _source_digests(remote: Remote, file: int, blocks: list[int]) -> dict[int, bytes]:
    """The daemon's digests of some blocks of a download's source, over its current bytes."""
    out: dict[int, bytes] = {}
    for part in batches(blocks, DIGEST_BATCH):
        while part:  # the daemon reads at most MAX_DIGEST_BYTES per call: ask for the rest
            got = await remote.call("POST", remote.session_url("/digests"),
                                    {"file": file, "blocks": part, "root": False})
            answered = {b: d for b, d in digests_answer(got)[0].items() if b in part}
            if not answered:
                raise ProtocolError("refused the daemon's digests answer: no digest given")
            out.update(answered)
            part = [b for b in part if b not in answered]
    return out


async def _source_root(remote: Remote, file: int) -> str | None:
    """The daemon's whole-file digest of a download's source over its current bytes
    (it answers ``pending`` until it has read the file within its per-call budget)."""
    while True:
        got = await remote.call("POST", remote.session_url("/digests"),
                                {"file": file, "blocks": [], "root": True})
        root = digests_answer(got)[1]
        if root is not None or not got.get("pending"):
            return root


async def _commit_downloads(remote: Remote, receivers: dict[int, FileReceiver],
                            entries: list[FileEntry], targets: dict[int, Path],
                            transforms: dict[int, BlockTransform], name: str,
                            executor: ThreadPoolExecutor,
                            result: TransferResult) -> list[TransportError]:
    """Publish every received file whose whole-file digest equals the daemon's; return the failures.

    The daemon computes each root over its file's current bytes from the digests
    of the blocks it read this session (it reads only blocks it had not: none
    when this run fetched or compared every block). The client's root comes
    from its journal, every record of which was checked against the partial's
    bytes. A file whose roots differ, or whose source changed during the
    session, is not published (its failure is returned); the others are.
    """
    loop = asyncio.get_running_loop()
    failed: list[TransportError] = []
    roots: dict[str, str] = {}
    errors: dict[str, str] = {}
    for part in batches(sorted(receivers), DIGEST_BATCH * 32):
        while part:  # files the daemon did not finish within its per-call budget: ask again
            got = await remote.call("POST", remote.session_url("/digests"), {"roots": part})
            roots.update(got.get("roots", {}))
            errors.update(got.get("errors", {}))
            pending = got.get("pending", [])
            part = [i for i in part if i in pending] if isinstance(pending, list) else []
    for i, rec in list(receivers.items()):
        shown = _display(name, entries[i], i in transforms)
        expected = roots.get(str(i))
        if expected is None:
            why = errors.get(str(i)) or f"{shown}: the daemon gave no whole-file digest"
            failed.append(IntegrityError(f"{why}; not published, run again"))
            continue
        try:
            plain = await loop.run_in_executor(executor, rec.plain_root) if i in transforms else None
            digest = await loop.run_in_executor(executor, rec.commit, expected)
        except IntegrityError as exc:
            failed.append(IntegrityError(f"{exc.message}; not published, run again"))
            continue
        del receivers[i]
        if plain is not None:  # the plaintext's digest, as `fallback checksum` gives it
            digest = plain
        elif entries[i].header:  # an envelope kept as it is: the digest of the file we wrote
            digest = await loop.run_in_executor(executor, digest_path, targets[i],
                                                DEFAULT_BLOCK_SIZE)
        result.checksums[shown] = digest
        result.mark_verified(shown, "full")
    return failed


# -- shared -------------------------------------------------------------------------------------------
async def _run_streams(make: Any, n: int, feed: BlockFeed | None) -> None:
    """Run ``n`` streams to completion; tolerate some dying, fail if all of them do."""
    tasks = [asyncio.ensure_future(make()) for _ in range(n)]
    errors: list[BaseException] = []
    try:
        for t in asyncio.as_completed(tasks):
            try:
                await t
            except ConnectionLost as exc:
                errors.append(exc)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if errors:
        log.info("%d of %d streams lost (%s)", len(errors), len(tasks), errors[0])
    if errors and len(errors) == len(tasks):
        raise errors[0]
    if errors and feed is not None and feed.pending:
        await _run_streams(make, max(1, n - len(errors)), feed)




def _plain_bytes(entry: FileEntry, blocks: RangeSet) -> int:
    """File bytes in ``blocks`` (only the last block of a file may be short)."""
    count = -(-entry.size // entry.block_size)
    total = 0
    for a, b in blocks:
        total += (b - a) * entry.block_size
        if b == count:
            total -= count * entry.block_size - entry.size
    return total


def _plain_len(entry: FileEntry, block: int) -> int:
    return min(entry.block_size, entry.size - block * entry.block_size)


def _plain_share(entry: FileEntry, wire_bytes: int) -> int:
    """File bytes carried by a wire block (its overhead is not file data)."""
    return max(0, wire_bytes - entry.overhead) if entry.overhead else wire_bytes


def strong_passphrase(p: str) -> bool:
    """The rule behind ``content_protection_strong_pass_required``: at least 12
    characters and at least three of: lower case, upper case, digits, symbols."""
    classes = [any(c.islower() for c in p), any(c.isupper() for c in p),
               any(c.isdigit() for c in p), any(not c.isalnum() for c in p)]
    return len(p) >= 12 and sum(classes) >= 3


def _display(name: str, entry: FileEntry, decrypted: bool) -> str:
    """The name a downloaded file gets locally (a decrypted envelope loses its suffix)."""
    shown = _shown(name, entry.path)
    return shown.removesuffix(env.SUFFIX) if decrypted else shown


def _shown(name: str, relpath: str) -> str:
    return f"{name}/{relpath}" if relpath else name


def transfer(src: str | os.PathLike[str], dst: str | os.PathLike[str],
             progress: ProgressCallback | None = None, **options: Any) -> TransferResult:
    """Blocking twin of ``transfer_async``; ``options`` are ``Options`` fields."""
    opts = Options(**options)
    try:
        import uvloop

        return uvloop.run(transfer_async(src, dst, opts, progress))
    except ImportError:  # pragma: no cover
        return asyncio.run(transfer_async(src, dst, opts, progress))

"""Download: check the daemon's manifest, plan against local partials, fetch, publish.

The daemon's answer is checked before any use (``fallback.answers``: names,
tree, sizes, local paths against symlinks). The client plans each file with
its own journal (``inspect_partial``), compares kept blocks with the daemon's
current bytes, asks for the blocks it misses, and publishes each file only if
its whole-file digest equals the daemon's over the source's current bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from pathlib import Path

from fallback import control as C
from fallback.answers import confine_download, plain_name
from fallback.client.filters import compile_rules, excluded, hidden
from fallback.client.session import (
    GIVE_UP_AFTER,
    TransferSession,
    display,
    plain_len,
    plain_share,
    shown,
)
from fallback.remote import Url
from fallback.result import Progress
from transport.blocks import envelope as env
from transport.blocks.digest import digest_path
from transport.blocks.inline import InlineTarget, is_inline
from transport.blocks.keyring import EnvelopeKeyring
from transport.blocks.layout import DEFAULT_BLOCK_SIZE
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import dir_mode
from transport.blocks.plan import (
    ResumeDecision,
    TargetState,
    batches,
    overwrite_action,
    resume_check,
    resume_decision,
)
from transport.blocks.receiver import FileReceiver, inspect_partial
from transport.blocks.session import BlockSink
from transport.blocks.statedir import StateDir, in_state_dir
from transport.blocks.transform import BlockTransform
from transport.blocks.tree import target_for
from transport.errors import (
    BadPassphrase,
    ConnectionLost,
    ErrorKind,
    IntegrityError,
    PathError,
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.http.client import download_stream

log = logging.getLogger("fallback.client")

PLAN_BATCH = 256
"""One-block files whose targets one executor job looks at when a download is planned."""

DIGEST_BATCH = 32
"""Blocks per ``/digests`` call: the daemon reads them within one request (32 x 4 MiB
is well under a second of disk), so no call nears the client's read timeout."""


class _SinkWork:
    """The path manager's view of a download's sink (the daemon holds the queue)."""

    def __init__(self, sink: BlockSink) -> None:
        self.sink = sink

    def pending(self) -> bool:
        return False  # only the daemon knows: a stream that ended found nothing to send

    def progress(self) -> int:
        return self.sink.received_bytes + self.sink.hole_bytes

    def lost(self, path: str) -> None:
        pass  # the daemon gives a dead stream's leases to the others (drop_path)

    def complete(self) -> bool:
        return self.sink.complete()


class DownloadSession(TransferSession):
    """One download of a file or folder from the daemon."""

    async def run(self, url: Url, dst: Path, into: bool) -> None:
        """The download; on failure the folders it created and left empty are removed (a
        wrong --decrypt passphrase used to leave the new destination folder behind).
        Folders holding kept partials stay, for a resume."""
        made: list[Path] = []
        try:
            await self._run(url, dst, into, made)
        except BaseException:
            for folder in reversed(made):  # deepest last created first
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            raise

    async def _run(self, url: Url, dst: Path, into: bool, made: list[Path]) -> None:
        opts, result = self.opts, self.result
        answer = await self.control.open_download(C.OpenDownload(url.path, opts.flow()))
        self.start_keepalive()
        entries, name = answer.entries, answer.name
        self.name = name
        for why in answer.skipped:  # e.g. symlinks leading out of the docroot
            rel, _, reason = why.partition(": ")
            result.skipped_files[shown(name, rel)] = reason or "skipped by the daemon"
        gone = excluded(compile_rules(opts.filters), [(e.path, e.is_dir) for e in entries]) \
            if opts.filters else {}
        for rel, why in gone.items():  # -N/-E: excluded names reported, never fetched
            result.skipped_files[shown(name, rel)] = why
        files = [i for i, e in enumerate(entries) if not e.is_dir and not hidden(gone, e.path)]
        streams = self.streams_for(answer.streams_max)
        root = dst / name if (into or dst.is_dir()) else dst
        anchor = root.parent  # the folder the user named, or the one the named root goes in
        if not opts.dry_run:
            if make_last_level(root.parent, create=into and root.parent == dst):
                made.append(root.parent)
        # Partials and journals go to the state folder at the top of the destination folder
        # (the one receiving the transfer root): same file system, never among the user's files.
        statedir = StateDir(root.parent)
        if statedir.holds(root) or in_state_dir(root.parent):
            raise PathError(f"{root}: would be in fallback's state folder (.fallback at the top "
                            "of a destination is reserved); choose another destination or name")
        result.files = len(files)
        result.bytes = sum(entries[i].size for i in files)
        result.note_block_sizes({shown(name, entries[i].path): entries[i].block_size
                                 for i in files})
        progress = Progress(result.bytes, self.remote.scheme, self.progress_cb,
                            {shown(name, entries[i].path): entries[i].size for i in files})
        self.progress = progress  # its transport follows each switch
        transforms: dict[int, BlockTransform] = {}
        targets: dict[int, Path] = {}
        ring: EnvelopeKeyring | None = None
        for i in files:
            e = entries[i]
            target = target_for(root, e.path)
            result.content[display(name, e, False)] = "envelope" if e.header else "plain"
            if opts.decrypt and e.transform == "identity" and shown(name, e.path).endswith(env.SUFFIX):
                # The daemon sends a file it cannot parse as an envelope (damaged header, wrong
                # length) as plain bytes; asked to decrypt it, say so instead of copying it.
                raise IntegrityError("File decryption error, damaged envelope or not an envelope: "
                                     f"{shown(name, e.path)}")
            if e.transform == "envelope-v1" and opts.decrypt:
                if ring is None:
                    assert opts.passphrase is not None
                    ring = EnvelopeKeyring(opts.passphrase)  # one per transfer (cached masters)
                try:
                    transforms[i] = await self.io(ring.open, e.header)
                except BadPassphrase:
                    raise BadPassphrase(
                        f"File decryption error, bad passphrase: {shown(name, e.path)}") from None
                del result.content[display(name, e, False)]
                result.content[display(name, e, True)] = "decrypted"
                target = target.with_name(plain_name(target.name, env.SUFFIX))
            targets[i] = target
        confine_download(anchor, [targets[i] if i in targets else target_for(root, e.path)
                                  for i, e in enumerate(entries)])
        for i in files:  # a file never goes into, nor replaces, a folder (cp, scp refuse)
            if targets[i].is_dir():
                raise TransportError(f"{targets[i]}: a folder of that name exists (a file "
                                     "cannot replace a folder)", kind=ErrorKind.CONFLICT)
        if opts.dry_run:
            for i in files:
                await self._dry_run(i, entries[i], targets[i], i in transforms)
            return
        for e in entries:
            if e.is_dir and not hidden(gone, e.path):
                path = target_for(root, e.path)
                if path.exists() and not path.is_dir():
                    raise TransportError(f"{path}: a file of that name exists", kind=ErrorKind.CONFLICT)
                if not path.exists():
                    made.append(path)
                path.mkdir(parents=True, exist_ok=True)
        receivers: dict[int, FileReceiver] = {}
        bundles = "bundles" in self.remote.features
        small = [i for i in files if bundles and is_inline(entries[i])] if bundles else []
        inline = await self._plan_inline(small, entries, targets, transforms, progress)
        sink = BlockSink(receivers, self.executor, inline=inline, state=statedir,
                         fsync=opts.fsync, name_of=lambda target, _rel: str(target))
        try:
            smallset = set(small)
            for i in files:
                if i not in smallset:
                    await self._plan_file(i, entries[i], targets[i], transforms.get(i),
                                          receivers, progress, statedir)
            sink.on_progress = lambda f, n: progress.carry(plain_share(entries[f], n),
                                                           shown(name, entries[f].path))
            sink.on_hole = lambda f, n: progress.hole(n, shown(name, entries[f].path))
            query = "?frames=2" if "frames2" in self.remote.features else ""
            if query and "holes" in self.remote.features:
                query += "&holes=1"  # blocks in holes of their file come as hole frames
            if bundles:
                query += "&bundles=1" if query else "?bundles=1"
            if "acks" in self.remote.features:
                query += "&acks=1" if query else "?acks=1"
                sink.track_acks()
                self.start_acks(lambda: self._report(sink))
            # The daemon paces what it sends (answer.flow); one that does not say so is paced
            # by reading no faster than --target-rate.
            pacer = self.pacer(None) if answer.flow is None else None
            paths = self.http_paths(streams, lambda path, on_block: download_stream(
                self.remote.http, self.remote.session_url("/blocks" + query), sink,
                headers=self.remote.stream_headers, ssl=self.remote.ssl, on_block=on_block,
                pacer=pacer))
            work = _SinkWork(sink)
            paths = await self.choose_paths(paths, lambda: not work.complete(), sink=sink,
                                            complete=work.complete, bundled=(
                                                sum(entries[i].size for i in small), len(small)))
            last, since = -1, time.monotonic()
            while True:
                want = sink.missing()
                if not want:
                    break
                if sink.received_bytes + sink.hole_bytes != last:
                    last, since = sink.received_bytes + sink.hole_bytes, time.monotonic()
                elif time.monotonic() - since > GIVE_UP_AFTER:
                    raise ConnectionLost(f"{sum(b - a for _, a, b in want)} blocks still missing, "
                                         f"no progress for {GIVE_UP_AFTER:.0f} s")
                else:
                    log.info("%d blocks still missing: asking again",
                             sum(b - a for _, a, b in want))
                    await asyncio.sleep(0.2)
                for k in range(0, len(want), C.MAX_RANGES):  # the daemon's cap per call
                    await self.control.want(C.WantRequest(tuple(want[k:k + C.MAX_RANGES])))
                await self.move(paths, work)
                self.check_acks()
                if sink.verified is not None:
                    await self._report(sink)  # the daemon learns of failed blocks at once
            await sink.flush()
            failed = await self._commit(sink, entries, targets, transforms)
            failed += await self._inline_results(sink, entries, targets, transforms)
            if failed:
                raise failed[0] if len(failed) == 1 else IntegrityError(
                    f"{len(failed)} files failed their final check, e.g. {failed[0].message}")
            for i in reversed(range(len(entries))):
                if entries[i].is_dir and not hidden(gone, entries[i].path):
                    path = target_for(root, entries[i].path)
                    os.chmod(path, dir_mode(entries[i].mode))  # no set-id/sticky; umask applies
                    os.utime(path, ns=(entries[i].mtime_ns, entries[i].mtime_ns))
            progress.finish()
        finally:
            result.sent_bytes = progress.carried  # also when failing: what this run did move
            result.skipped_bytes = progress.skipped
            result.hole_bytes = progress.holes
            await sink.close()  # checkpoints what is left, keeping partials for a resume
            try:
                await self.io(statedir.tidy)  # gone unless partials are left
            except OSError:
                pass  # an empty state folder left behind is harmless

    async def _plan_inline(self, small: list[int], entries: list[FileEntry],
                           targets: dict[int, Path], transforms: dict[int, BlockTransform],
                           progress: Progress) -> dict[int, InlineTarget]:
        """Plan the one-block files (they come in bundles, ``transport.blocks.inline``):
        one executor job per ``PLAN_BATCH`` files looks at their targets; those the
        overwrite policy compares are compared with the daemon's whole-file digests,
        asked for many files per call. Returns the files to receive."""
        opts, result = self.opts, self.result
        actions: dict[int, str] = {}
        local: dict[int, str] = {}
        for k in range(0, len(small), PLAN_BATCH):
            part = small[k:k + PLAN_BATCH]
            got = await self.io(_inline_actions, part, entries, targets, transforms, opts.overwrite)
            for i, (action, digest) in got.items():
                actions[i] = action
                if digest is not None:
                    local[i] = digest
        compare = sorted(local)
        for k in range(0, len(compare), DIGEST_BATCH * 32):
            part = compare[k:k + DIGEST_BATCH * 32]
            roots: dict[int, str] = {}
            for _ in range(_pending_calls(sum(entries[i].size for i in part))):
                got_roots = await self.control.roots(C.RootsRequest(tuple(part)))
                roots.update(got_roots.roots)
                part = [i for i in part if i in got_roots.pending]
                if not part:
                    break
            for i in compare[k:k + DIGEST_BATCH * 32]:
                actions[i] = "skip" if roots.get(i) == local[i] else "transfer"
                if actions[i] == "skip":
                    result.checksums[shown(self.name, entries[i].path)] = local[i]
        out: dict[int, InlineTarget] = {}
        for i in small:
            if actions[i] == "skip":
                file = shown(self.name, entries[i].path)
                result.skipped_files[file] = "exists" if opts.overwrite != "diff" else "unchanged"
                progress.skip(entries[i].size, file)
            else:
                out[i] = InlineTarget(targets[i], entries[i], transforms.get(i))
        return out

    async def _inline_results(self, sink: BlockSink, entries: list[FileEntry],
                              targets: dict[int, Path], transforms: dict[int, BlockTransform]
                              ) -> list[TransportError]:
        """Checksums of the one-block files published with their groups; their failures."""
        kept = [i for i in sink.inline_done if entries[i].header and i not in transforms]
        written = await self.io(lambda: {i: digest_path(targets[i], DEFAULT_BLOCK_SIZE)
                                         for i in kept})  # an envelope kept as it is
        for i, done in sink.inline_done.items():
            file = display(self.name, entries[i], i in transforms)
            self.result.checksums[file] = done.plain_root or written.get(i) or done.root
            self.result.mark_verified(file, "full")
        return [IntegrityError(f"{err.message}; not published, run again")
                for err in sink.inline_errors.values()]

    async def _dry_run(self, i: int, entry: FileEntry, target: Path, decoded: bool) -> None:
        """``--dry-run``: what the overwrite policy would do with one file; nothing written.
        A file that ``diff`` compares is compared as the real run would (the local digest
        against the daemon's): an unchanged one is listed as skipped, not moving."""
        file = shown(self.name, entry.path)
        try:
            st = os.lstat(target)
        except OSError:
            st = None
        state = TargetState(exists=st is not None, is_dir=target.is_dir(),
                            size=st.st_size if st else 0, mtime_ns=st.st_mtime_ns if st else 0)
        action = overwrite_action(entry, state, self.opts.overwrite)
        if action == "compare" and not decoded and not entry.header:
            local = await self.io(digest_path, target, entry.block_size)
            action = "skip" if local == await self._source_root(i, entry) else "transfer"
        if action == "skip":
            self.result.skipped_files[file] = \
                "exists" if self.opts.overwrite != "diff" else "unchanged"
        else:
            self.result.would_transfer.append(file)

    async def _plan_file(self, i: int, entry: FileEntry, target: Path,
                         transform: BlockTransform | None, receivers: dict[int, FileReceiver],
                         progress: Progress, statedir: StateDir) -> None:
        opts, result = self.opts, self.result
        file = shown(self.name, entry.path)
        decoded = transform is not None
        partial = await self.io(lambda: inspect_partial(target, decoded=decoded, state=statedir))
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        state = TargetState(exists=st is not None, is_dir=target.is_dir(),
                            size=st.st_size if st else 0, mtime_ns=st.st_mtime_ns if st else 0,
                            journal=partial.identity, have=partial.have)
        compare_entry = entry if not decoded else FileEntry(
            entry.path, "file", size=entry.size, mtime_ns=entry.mtime_ns,
            block_size=entry.block_size)
        action = overwrite_action(compare_entry, state, opts.overwrite)
        if action == "compare":
            if decoded or entry.header:
                action = "transfer"  # ciphertext and plaintext digests are not comparable
            else:
                local = await self.io(digest_path, target, entry.block_size)
                action = "skip" if local == await self._source_root(i, entry) else "transfer"
                if action == "skip":
                    result.checksums[file] = local
        if action == "skip":
            result.skipped_files[file] = "exists" if opts.overwrite != "diff" else "unchanged"
            progress.skip(entry.size, file)
            return
        decision = ResumeDecision(False)
        compared: set[int] = set()  # journaled blocks compared with the daemon's current bytes
        check = resume_check(opts.resume, entry, state)
        if check is not None:
            fresh = await self._source_digests(i, check.samples)
            compared = set(check.samples)
            decision = resume_decision(opts.resume, check, state, fresh)
        target.parent.mkdir(parents=True, exist_ok=True)
        rec = await self.io(lambda: FileReceiver(
            target, entry, resume=decision.resume, decode=transform, fsync=opts.fsync,
            state=statedir, rebase=decision.rebase))
        receivers[i] = rec
        if decision.stale:  # kept blocks whose source bytes changed: fetched again
            await self.io(rec.drop_blocks, decision.stale)
        if rec.unverified:
            # Kept from an earlier run: the partial's bytes must still match the journal (read
            # back here, local), and the journal the daemon's current bytes (blocks the resume
            # check did not sample are compared now, so a stale partial costs only its changed
            # blocks).
            await self.io(rec.verify_carried)
            kept = rec.have()
            current = await self._source_digests(i, sorted(set(kept) - compared))
            stale = sorted(b for b, d in current.items() if kept.get(b) != d)
            await self.io(rec.drop_blocks, stale)
        have = set(rec.have())
        progress.skip(sum(plain_len(entry, b) for b in have), file)

    async def _report(self, sink: BlockSink) -> None:
        """Tell the daemon which blocks are journaled (it retires them) and which were
        discarded (it sends them again)."""
        await sink.flush()
        journaled, rejected = sink.take_acks()
        if journaled or rejected:
            try:
                await self.control.acks(C.Acks.from_pairs(journaled, rejected))
            except (ConnectionLost, RemoteError):
                sink.journaled[:0] = journaled  # told with the next report
                sink.rejected[:0] = rejected
                raise

    async def _source_digests(self, file: int, blocks: list[int]) -> dict[int, bytes]:
        """The daemon's digests of some blocks of a download's source, over its current bytes."""
        out: dict[int, bytes] = {}
        for part in batches(blocks, DIGEST_BATCH):
            while part:  # the daemon reads at most MAX_DIGEST_BYTES per call: ask for the rest
                got = await self.control.digests(C.DigestsRequest(file, tuple(part), False))
                answered = {b: d for b, d in got.digests.items() if b in part}
                if not answered:
                    raise ProtocolError("refused the daemon's digests answer: no digest given")
                out.update(answered)
                part = [b for b in part if b not in answered]
        return out

    async def _source_root(self, file: int, entry: FileEntry) -> str | None:
        """The daemon's whole-file digest of a download's source over its current bytes. It
        answers ``pending`` until it has read the file within its per-call budget; a daemon
        that stays pending longer than the file's size needs is refused."""
        for _ in range(_pending_calls(entry.size)):
            got = await self.control.digests(C.DigestsRequest(file, (), True))
            if got.root is not None or not got.pending:
                return got.root
        raise ProtocolError(f"the daemon kept its digest of file {file} pending")

    async def _commit(self, sink: BlockSink, entries: list[FileEntry], targets: dict[int, Path],
                      transforms: dict[int, BlockTransform]) -> list[TransportError]:
        """Publish every received file whose whole-file digest equals the daemon's; return the
        failures.

        The daemon computes each root over its file's current bytes from the digests
        of the blocks it read this session (it reads only blocks it had not: none
        when this run fetched or compared every block). The client's root comes
        from its journal, every record of which was checked against the partial's
        bytes. A file whose roots differ, or whose source changed during the
        session, is not published (its failure is returned); the others are.
        """
        receivers = sink.receivers
        failed: list[TransportError] = []
        roots: dict[int, str] = {}
        errors: dict[int, str] = {}
        for part in batches(sorted(receivers), DIGEST_BATCH * 32):
            # Files the daemon did not finish within its per-call budget: ask again, at most
            # as often as their sizes need (a daemon that stays pending longer is refused).
            for _ in range(_pending_calls(sum(entries[i].size for i in part))):
                got = await self.control.roots(C.RootsRequest(tuple(part)))
                roots.update(got.roots)
                errors.update(got.errors)
                part = [i for i in part if i in got.pending]
                if not part:
                    break
            else:
                raise ProtocolError("the daemon kept whole-file digests pending")
        for i, rec in list(receivers.items()):
            file = display(self.name, entries[i], i in transforms)
            expected = roots.get(i)
            if expected is None:
                why = errors.get(i) or f"{file}: the daemon gave no whole-file digest"
                failed.append(IntegrityError(f"{why}; not published, run again"))
                continue
            try:
                plain = await self.io(rec.plain_root) if i in transforms else None
                digest = await self.io(rec.commit, expected)
            except IntegrityError as exc:
                failed.append(IntegrityError(f"{exc.message}; not published, run again"))
                continue
            sink.committed(i)
            if plain is not None:  # the plaintext's digest, as `fallback checksum` gives it
                digest = plain
            elif entries[i].header:  # an envelope kept as it is: the digest of the file we wrote
                digest = await self.io(digest_path, targets[i], DEFAULT_BLOCK_SIZE)
            self.result.checksums[file] = digest
            self.result.mark_verified(file, "full")
        return failed


def _inline_actions(files: list[int], entries: list[FileEntry], targets: dict[int, Path],
                    transforms: dict[int, BlockTransform], overwrite: str
                    ) -> dict[int, tuple[str, str | None]]:
    """Worker thread: ``(transfer | skip | compare, local digest when compared)`` for
    one-block files, from their targets' attributes (as ``_plan_file`` decides)."""
    out: dict[int, tuple[str, str | None]] = {}
    for i in files:
        entry, target = entries[i], targets[i]
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            out[i] = ("transfer", None)
            continue
        state = TargetState(exists=True, is_dir=stat.S_ISDIR(st.st_mode), size=st.st_size,
                            mtime_ns=st.st_mtime_ns)
        decoded = i in transforms
        compare_entry = entry if not decoded else FileEntry(
            entry.path, "file", size=entry.size, mtime_ns=entry.mtime_ns,
            block_size=entry.block_size)
        action = overwrite_action(compare_entry, state, overwrite)
        if action == "compare":
            if decoded or entry.header or not stat.S_ISREG(st.st_mode):
                action = "transfer"  # ciphertext and plaintext digests are not comparable
            else:
                out[i] = ("compare", digest_path(target, entry.block_size))
                continue
        out[i] = (action, None)
    return out


def make_last_level(folder: Path, *, create: bool) -> bool:
    """The folder a download's root goes into must exist. Only a destination named as a
    folder (``newdir/``) in an existing one is created; a missing tree never is (cp and scp
    refuse it too). Raises ``PathError`` naming the folder; True when it was created."""
    if folder.is_dir():
        return False
    if folder.exists() or folder.is_symlink():
        raise PathError(f"{folder}: not a folder", kind=ErrorKind.CONFLICT)
    if not create or not folder.parent.is_dir():
        raise PathError(f"{folder}: no such folder (fallback creates only the last level of "
                        "a destination named with a trailing /; create the others first)",
                        kind=ErrorKind.NOT_FOUND)
    folder.mkdir()
    log.info("created the folder %s", folder)
    return True


def _pending_calls(nbytes: int) -> int:
    """How many ``/digests`` calls reading ``nbytes`` can take at the daemon's budget of
    ``MAX_DIGEST_READ`` per call, with room for rounding (bounds a daemon's ``pending``)."""
    return 3 + nbytes // C.MAX_DIGEST_READ

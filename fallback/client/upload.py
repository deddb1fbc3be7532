"""Upload: walk the source, plan against the daemon's state, send, commit.

The client plans (``transport.blocks.plan``): it sees the source and what the
daemon reports for each target, applies the overwrite policy and the resume
check, and plans each file (skip, fresh, resume). The daemon answers with the
blocks it misses; the paths send them and the commit verifies and publishes
each file, saying which blocks are still missing (sent again) or which
carried-over blocks it is still re-reading (asked again).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fallback import answers as A
from fallback import control as C
from fallback.client.filters import filter_tree
from fallback.client.options import strong_passphrase
from fallback.client.session import (
    TransferSession,
    plain_bytes,
    plain_len,
    plain_share,
    shown,
)
from fallback.remote import Url
from fallback.result import Progress
from transport.blocks import envelope as env
from transport.blocks.digest import digest_path, file_digest
from transport.blocks.keyring import EnvelopeKeyring
from transport.blocks.manifest import FileEntry
from transport.blocks.plan import (
    TargetState,
    overwrite_action,
    resume_check,
    resume_decision,
    to_ranges,
    trusted_blocks,
)
from transport.blocks.session import BlockSender
from transport.blocks.source import FileSource
from transport.blocks.transform import BlockTransform
from transport.blocks.tree import walk_source
from transport.errors import ConnectionLost, RemoteError, TransportError
from transport.http.client import upload_stream

log = logging.getLogger("fallback.client")

PLAN_BATCH = 256
"""Files planned per executor job (reading their sources' state, encrypting headers)."""

COMMIT_BATCH = 8192
"""Files one ``/commit`` call names: the answer for 100,000 files, parsed whole, was the
upload client's peak (issue 11: ~60 MB per 30,000 files above its steady state)."""

MAX_RESENDS = 5
"""Times the daemon may report one block missing at commit before the upload fails:
a block is sent again when the daemon dropped it (a carried-over block failing its
re-verification) or lost it; one that never sticks means something is wrong there."""


class _SendWork:
    """The path manager's view of an upload's sender."""

    def __init__(self, sender: BlockSender) -> None:
        self.sender = sender

    def pending(self) -> bool:
        return self.sender.pending

    def progress(self) -> int:
        return self.sender.sent_bytes + self.sender.hole_bytes + self.sender.sched.stats.acked

    def lost(self, path: str) -> None:
        self.sender.drop_path(path)  # its leases, delivered ones too, go to the others

    def complete(self) -> bool:
        return self.sender.closed or (not self.sender.pending
                                      and not self.sender.sched.undelivered_elsewhere(""))


def _count_resends(resent: dict[tuple[int, int], int],
                   again: list[tuple[int, int, int]]) -> None:
    """Count each block the daemon asks for again; ``ConnectionLost`` past ``MAX_RESENDS``."""
    worst = 0
    for f, a, b in again:
        if b - a > 4096:
            continue  # a large range is a first send of blocks never delivered, not a resend
        for k in range(a, b):
            resent[f, k] = resent.get((f, k), 0) + 1
            worst = max(worst, resent[f, k])
    if worst > MAX_RESENDS:
        n = sum(b - a for _, a, b in again)
        raise ConnectionLost(f"{n} blocks still missing after {MAX_RESENDS} attempts")


class UploadSession(TransferSession):
    """One upload of a local file or folder to the daemon."""

    ring: EnvelopeKeyring | None = None  # --encrypt: one keyring (one Argon2id) per transfer
    tree_names: list[str] | None = None  # entry index -> display name (checksums' keys)

    async def run(self, src: Path, url: Url) -> None:
        opts, result = self.opts, self.result
        tree = await self.io(functools.partial(
            walk_source, src, opts.block_bytes, links=opts.symbolic_links,
            links_within=src if opts.symbolic_links == "follow" else None))
        name = local_name(src)  # dir/link lands as "link", not as its target's name
        self.name = name
        self.tree_names = [shown(name, e.path) for e in tree.entries]
        for why in tree.skipped:  # special files, unreadable folders: reported, the rest goes on
            rel, _, reason = why.partition(": ")
            result.skipped_files[shown(name, rel)] = reason
        if opts.filters:  # -N/-E: excluded names reported, the rest goes on
            for rel, why in filter_tree(tree, opts.filters).items():
                result.skipped_files[shown(name, rel)] = why
        entries = list(tree.entries)
        if opts.encrypt:
            entries = [_encrypted_placeholder(e) for e in entries]
        files = [i for i, e in enumerate(entries) if not e.is_dir]
        result.files = len(files)
        result.bytes = sum(entries[i].size for i in files)
        result.note_block_sizes({shown(name, tree.entries[i].path): tree.entries[i].block_size
                                 for i in files})
        opened = await self.control.open_upload(C.OpenUpload(
            path=url.path, into_dir=url.into_dir,
            name=name + (env.SUFFIX if opts.encrypt and not entries[0].is_dir else ""),
            entries=tuple(entries), overwrite=opts.overwrite, encrypt=opts.encrypt,
            strong_pass=bool(opts.encrypt and opts.passphrase
                             and strong_passphrase(opts.passphrase)), flow=opts.flow()))
        self.start_keepalive()
        states = opened.states
        if opts.dry_run:
            await self._dry_run(entries, states, files, tree.entries, tree.paths)
            return
        streams = self.streams_for(opened.streams_max)
        progress = Progress(result.bytes, self.remote.scheme, self.progress_cb,
                            {shown(name, entries[i].path): entries[i].size for i in files})
        self.progress = progress  # its transport follows each switch
        sources: dict[int, FileSource] = {}
        plan: dict[int, C.PlanItem] = {}
        trusted: dict[int, set[int]] = {}  # journaled blocks kept without comparing them
        reads: set[asyncio.Task[Any]] = set()
        sender: BlockSender | None = None
        try:
            for k in range(0, len(files), PLAN_BATCH):  # one executor job per batch, not per file
                planned_items = await self.io(self._plan_batch, files[k:k + PLAN_BATCH], entries,
                                              states, tree, sources, trusted)
                for item, skip in planned_items:
                    plan[item.file] = item
                    if skip:
                        progress.skip(skip, shown(name, entries[item.file].path))
            counts = {i: s.layout.count for i, s in sources.items()}
            planned = await self.control.plan(C.PlanRequest(tuple(plan.values())), counts)
            plan.clear()  # (issue 11: per-file state not needed any more is let go)
            missing = dict(planned.missing)
            for k, why in planned.refused.items():
                # The server's overwrite=deny kept an existing target: skipped, with its reason.
                sources.pop(k).close()
                missing.pop(k, None)
                result.skipped_files[shown(name, tree.entries[k].path)] = \
                    f"refused by the server: {why}"
                progress.skip(entries[k].size, shown(name, entries[k].path))
            sender = BlockSender(sources, self.executor)
            kept: dict[int, set[int]] = {}  # blocks counted as skipped (held by the daemon)
            for i, blocks in missing.items():
                have = blocks.complement(0, sources[i].layout.count)
                if have:  # (an empty set per file is 216 bytes: 21 MB at 100,000 files)
                    kept[i] = set(have.members())
                    progress.skip(plain_bytes(entries[i], have), shown(name, entries[i].path))
                for a, b in blocks:
                    sender.sched.want(i, [(a, b)])
            # Block digests, read or kept, for the whole-file digest: one dict keyed by (file,
            # block), not a dict per file (232 bytes each: 23 MB at 100,000 files; issue 11).
            digests: dict[tuple[int, int], bytes] = {
                (i, b): d for i in sources for b, d in states[i].have.items()}
            for i, blocks in missing.items():
                # The daemon may hold blocks it had not journaled yet when it reported its state
                # (the last records of a session it took over): digest those from the source,
                # or the whole-file digest at commit misses them and the partial is thrown away.
                have = blocks.complement(0, sources[i].layout.count)
                unseen = [b for b in have.members() if (i, b) not in digests]
                for b in unseen:
                    digests[i, b] = (await self.io(sources[i].read_wire, b))[1]
                if unseen and i in trusted:
                    trusted[i] -= set(unseen)
            del planned, missing, counts
            states.clear()  # the daemon's states (``opened.states``): their digests were copied

            def read(f: int, b: int, digest: bytes) -> None:
                # A block read from the source is no longer one trusted from the journal.
                digests[f, b] = digest
                held = trusted.get(f)
                if held:
                    held.discard(b)

            sender.on_read = read
            sender.on_progress = lambda f, n: progress.carry(plain_share(entries[f], n),
                                                             shown(name, entries[f].path))
            sender.on_hole = lambda f, n: progress.hole(n, shown(name, entries[f].path))
            version = 2 if "frames2" in self.remote.features else 1
            holes = version == 2 and "holes" in self.remote.features
            pacer = self.pacer(opened.flow)
            governor = self.governor(opened.flow, streams)
            paths = self.http_paths(streams, lambda path, on_block: upload_stream(
                self.remote.http, self.remote.session_url("/blocks"), sender, path,
                headers=self.remote.stream_headers, ssl=self.remote.ssl, on_block=on_block,
                version=version, pacer=pacer, governor=governor, holes=holes,
                bundles="bundles" in self.remote.features))
            if "acks" in self.remote.features:
                async def exchange() -> None:
                    got = await self.control.acks(C.Acks())
                    sender.acks(got.journaled, got.failed)
                self.start_acks(exchange)
            small = [i for i in sources if sources[i].layout.count == 1] \
                if "bundles" in self.remote.features else []
            work = _SendWork(sender)
            paths = await self.choose_paths(
                paths, lambda: not sender.done and not sender.closed, sender=sender,
                block=max((s.layout.max_stored_block for s in sources.values()), default=1),
                bundled=(sum(entries[i].size for i in small), len(small)))
            plain_roots: dict[int, str] = {}
            resent: dict[tuple[int, int], int] = {}  # commit said missing, how often
            while True:
                if sender.pending:
                    await self.move(paths, work)
                self.check_acks()
                for s in sources.values():
                    s.check_unchanged()
                again: list[tuple[int, int, int]] = []
                verifying = False
                failed: RemoteError | None = None
                todo = [i for i in sources if i not in plain_roots]
                for k in range(0, len(todo), COMMIT_BATCH):  # bounded answers (issue 11)
                    batch = todo[k:k + COMMIT_BATCH]
                    committed = await self.control.commit(C.CommitRequest(tuple(
                        C.CommitItem(i, file_digest(entries[i].block_size, entries[i].size,
                                                    (digests.get((i, b), b"") for b in
                                                     range(sources[i].layout.count))))
                        for i in batch)), {i: sources[i].layout.count for i in batch})
                    for i, r in committed.results.items():
                        if isinstance(r, A.CommitFailed):
                            failed = failed or RemoteError(r.error, peer_status=r.status)
                        elif isinstance(r, A.Committed):
                            plain_roots[i] = r.root
                            file = shown(name, tree.entries[i].path)
                            fsrc = sources[i]
                            if not opts.encrypt:
                                result.checksums[file] = r.root
                            elif len(fsrc.plain_digests) == fsrc.layout.count:  # all read
                                result.checksums[file] = fsrc.plain_root()
                            else:
                                result.checksums[file] = await self.io(fsrc.plain_root)
                            if opts.encrypt:  # the name the daemon stored the envelope under
                                result.stored_as[file] = shown(name + env.SUFFIX, "") \
                                    if not entries[i].path else shown(name, entries[i].path)
                            result.mark_verified(file, "sampled" if trusted.get(i) else "full")
                        elif isinstance(r, A.CommitVerifying):
                            verifying = True  # the daemon is still re-reading its partial
                        else:
                            again.extend((i, a, b) for a, b in r.missing)
                            for b in [b for b in kept.get(i, set()) if b in r.missing]:
                                kept[i].discard(b)  # dropped at the daemon: carried after all
                                progress.unskip(plain_len(entries[i], b),
                                                shown(name, entries[i].path))
                    del committed
                if failed is not None:
                    raise failed
                if not again:
                    if verifying:
                        continue
                    break
                _count_resends(resent, again)
                log.info("the daemon still misses %d blocks: sending them again",
                         sum(b - a for _, a, b in again))
                sender.add_ranges(again)  # acknowledged or not, they are sent again
            progress.finish()
        finally:
            result.sent_bytes = progress.carried  # also when failing: what this run did move
            if sender is not None:  # pieces a dead path had carried, carried again
                result.retransmitted_bytes += sender.resent_bytes
            result.skipped_bytes = progress.skipped
            result.hole_bytes = progress.holes
            running = reads - {asyncio.current_task()}
            if running:  # a dead stream may leave a read-ahead running: let it end first
                await asyncio.wait(running)
            for s in sources.values():
                s.close()

    def published(self, raw: Any) -> None:
        """The daemon's close answer named the one-block files it published with their
        bundles (``{index: root}``): those not committed yet (a Ctrl-C before the commit)
        join ``checksums``, verified by the daemon against the digest this client sent."""
        if not isinstance(raw, dict) or self.opts.encrypt or self.tree_names is None:
            return
        for key, root in raw.items():
            try:
                file = self.tree_names[int(key)]
            except (ValueError, IndexError):
                continue
            if isinstance(root, str) and file not in self.result.checksums \
                    and file not in self.result.skipped_files:
                self.result.checksums[file] = root
                self.result.mark_verified(file, "full")

    async def _dry_run(self, entries: list[FileEntry], states: list[TargetState],
                       files: list[int], named: list[FileEntry], paths: Sequence[Path]) -> None:
        """``--dry-run``: what the overwrite policy would do with each file, nothing moved.
        A file that ``diff`` compares is digested here as the real run would (the daemon's
        digest came with the open): an unchanged one is listed as skipped, not moving."""
        for i in files:
            file = shown(self.name, named[i].path)
            action = overwrite_action(entries[i], states[i], self.opts.overwrite)
            if action == "compare" and not self.opts.encrypt:
                local = await self.io(digest_path, paths[i], entries[i].block_size)
                action = "skip" if local == states[i].root else "transfer"
            if action == "skip":
                self.result.skipped_files[file] = \
                    "exists" if self.opts.overwrite != "diff" else "unchanged"
            else:
                self.result.would_transfer.append(file)

    def _plan_batch(self, files: list[int], entries: list[FileEntry], states: list[TargetState],
                    tree: Any, sources: dict[int, FileSource], trusted: dict[int, set[int]]
                    ) -> list[tuple[C.PlanItem, int]]:
        """Worker thread: ``_plan_file`` for each of ``files``; (plan item, bytes skipped)."""
        return [self._plan_file(i, entries, states[i], tree.paths[i], tree.entries[i].path,
                                sources, trusted) for i in files]

    def _plan_file(self, i: int, entries: list[FileEntry], state: TargetState, path: Path,
                   rel: str, sources: dict[int, FileSource], trusted: dict[int, set[int]]
                   ) -> tuple[C.PlanItem, int]:
        """Decide file ``i`` (worker thread): skip, fresh or resume (reading the source where
        the check needs); returns the plan item and the bytes it skips."""
        opts, result = self.opts, self.result
        entry = entries[i]
        file = shown(self.name, rel)
        result.content[file] = "envelope" if opts.encrypt else "plain"
        transform: BlockTransform | None = None
        if opts.encrypt:
            if self.ring is None:
                assert opts.passphrase is not None
                self.ring = EnvelopeKeyring(opts.passphrase)
            entry, transform = _encrypted_entry(entry, state, self.ring)
            entries[i] = entry
        action = overwrite_action(entry, state, opts.overwrite)
        if action == "compare":
            local = digest_path(path, entry.block_size)
            action = "skip" if local == state.root else "transfer"
            if action == "skip":
                result.checksums[file] = local
        if action == "skip":
            result.skipped_files[file] = "exists" if opts.overwrite != "diff" else "unchanged"
            return C.PlanItem(i, "skip"), entry.size
        src_file = FileSource(path, entry, encode=transform)
        sources[i] = src_file
        check = resume_check(opts.resume, entry, state)
        if check is None:
            return C.PlanItem(i, "fresh", entry), 0
        fresh = {b: src_file.read_block(b)[1] for b in check.samples}
        decision = resume_decision(opts.resume, check, state, fresh)
        if not decision.resume:
            return C.PlanItem(i, "fresh", entry), 0
        # only files with trusted blocks get a set (none for fresh files)
        trusted[i] = trusted_blocks(state.have, opts.resume)
        return C.PlanItem(i, "resume", entry, decision.rebase,
                          tuple(to_ranges(decision.stale))), 0


def local_name(src: Path) -> str:
    """The name a local source gets at the destination: its own name as given (``dir/link``
    is ``link``; ``.`` is the current folder's name), never its symlink target's."""
    return os.path.basename(os.path.abspath(src)) or str(src)


def _encrypted_placeholder(entry: FileEntry) -> FileEntry:
    """Open-time entry: the daemon reports its partial's header, so a resume can reuse the salt."""
    if entry.is_dir:
        return entry
    return FileEntry(entry.path + env.SUFFIX if entry.path else "", "file", size=entry.size,
                     mtime_ns=entry.mtime_ns, mode=entry.mode, block_size=entry.block_size,
                     transform="envelope-v1", overhead=env.OVERHEAD)


def _encrypted_entry(entry: FileEntry, state: TargetState,
                     ring: EnvelopeKeyring) -> tuple[FileEntry, BlockTransform]:
    """The envelope for one file: the partial's header when it is ours to resume (version 1
    or 2), else a new version 2 one. ``ring`` is the transfer's one keyring: one Argon2id
    for all its new envelopes (``transport.blocks.keyring``)."""
    j = state.journal
    if j and j[:4] == [entry.size, entry.mtime_ns, entry.block_size, "envelope-v1"] and j[4]:
        try:
            t = ring.open(bytes.fromhex(str(j[4])))
            return _with_header(entry, t), t
        except (TransportError, ValueError):
            pass  # another passphrase or a damaged header: start this file over
    t = ring.for_upload(entry.size, entry.block_size)
    return _with_header(entry, t), t


def _with_header(entry: FileEntry, t: BlockTransform) -> FileEntry:
    return FileEntry(entry.path, "file", size=entry.size, mtime_ns=entry.mtime_ns, mode=entry.mode,
                     block_size=entry.block_size, header=t.header, overhead=t.overhead,
                     transform=t.name)

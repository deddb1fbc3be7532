"""ascp's include/exclude rules (``-N PATTERN`` / ``-E PATTERN``) over a transfer's tree.

Semantics, as ascp documents them ("Using filters to include and exclude files"):
rules are tried in the order given and the **first matching rule decides** (``-N``
includes, ``-E`` excludes); a name no rule matches is included. An excluded folder
takes everything below it along (its contents are never compared with later rules),
so ``-N '*.txt' -E '*'`` sends only the ``.txt`` files at the top of a folder, and
``-N '*/' -N '*.txt' -E '*'`` those at every depth.

Patterns are globs: ``*`` and ``?`` never match ``/``, ``**`` matches across folders,
``[abc]`` / ``[!abc]`` are character classes. A pattern without ``/`` matches a name
(the last component) at any depth; one that starts with ``/`` is anchored at the
transfer root (``/sub/a.txt`` is the root's ``sub/a.txt``); any other pattern with
``/`` matches the path below the root; a trailing ``/`` matches folders only. The
transfer root itself is never filtered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fallback.errors import UsageError
from transport.blocks.tree import SourceTree


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: ``include`` or not, the pattern as given, its regex."""

    include: bool
    pattern: str
    regex: re.Pattern[str]
    dirs_only: bool
    whole_path: bool

    def matches(self, relpath: str, is_dir: bool) -> bool:
        if self.dirs_only and not is_dir:
            return False
        subject = relpath if self.whole_path else relpath.rpartition("/")[2]
        return self.regex.fullmatch(subject) is not None

    @property
    def flag(self) -> str:
        return "-N" if self.include else "-E"


def _glob(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_rules(rules: Sequence[tuple[str, str]]) -> list[Rule]:
    """``[("include"|"exclude", pattern), ...]`` -> rules; ``UsageError`` for a bad pattern."""
    out = []
    for kind, pattern in rules:
        body = pattern
        dirs_only = body.endswith("/") and body != "/"
        body = body.rstrip("/") or body
        anchored = body.startswith("/")
        body = body.lstrip("/")
        if not body:
            raise UsageError(f"{'-N' if kind == 'include' else '-E'} {pattern!r}: empty pattern")
        try:
            regex = re.compile(_glob(body), re.DOTALL)
        except re.error as exc:
            raise UsageError(f"bad pattern {pattern!r}: {exc}") from None
        out.append(Rule(kind == "include", pattern, regex, dirs_only, anchored or "/" in body))
    return out


def decide(rules: Sequence[Rule], relpath: str, is_dir: bool) -> Rule | None:
    """The rule that excludes ``relpath`` (the first matching one, when it is ``-E``), or None."""
    for rule in rules:
        if rule.matches(relpath, is_dir):
            return None if rule.include else rule
    return None


def excluded(rules: Sequence[Rule], paths: Sequence[tuple[str, bool]]) -> dict[str, str]:
    """Of ``(relpath, is_dir)`` pairs in tree order (parents first; ``""`` is the root), the
    ones excluded, each with its reason (``excluded by -E 'PATTERN'``); the contents of an
    excluded folder are excluded with it and not listed."""
    out: dict[str, str] = {}
    gone: set[str] = set()
    for relpath, is_dir in paths:
        if not relpath:
            continue
        parent = relpath.rpartition("/")[0]
        if parent in gone:
            if is_dir:
                gone.add(relpath)
            continue
        rule = decide(rules, relpath, is_dir)
        if rule is not None:
            out[relpath] = f"excluded by {rule.flag} {rule.pattern!r}"
            if is_dir:
                gone.add(relpath)
    return out


def hidden(excluded_paths: dict[str, str], relpath: str) -> bool:
    """``relpath`` is excluded, itself or through a folder above it."""
    while relpath:
        if relpath in excluded_paths:
            return True
        relpath = relpath.rpartition("/")[0]
    return False


def filter_tree(tree: SourceTree, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Drop from ``tree`` (in place) what ``rules`` exclude; returns ``relpath -> reason``."""
    compiled = compile_rules(rules)
    gone = excluded(compiled, [(e.path, e.is_dir) for e in tree.entries])
    if gone:
        keep = [k for k, e in enumerate(tree.entries) if not hidden(gone, e.path)]
        tree.entries[:] = [tree.entries[k] for k in keep]
    return gone

"""Compact per-file state (issue 11: 100,000 small files under 300 MB): each compact form
behaves as the plain one it replaces.

``FileSets`` (the scheduler's per-file block sets) against a dict of ``RangeSet``s under
random operations; ``jsonbody.encode`` against ``json.dumps``; ``SourceTree.paths``
against the paths the walk visits.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from fallback import control as C
from fallback.jsonbody import SLICE, Items, encode
from transport.blocks.filesets import FileSets
from transport.blocks.manifest import FileEntry
from transport.blocks.ranges import RangeSet
from transport.blocks.tree import walk_source


def test_filesets_behave_as_a_dict_of_rangesets() -> None:
    rng = random.Random(11)
    sets, plain = FileSets(), {f: RangeSet() for f in range(6)}
    for _ in range(5000):
        f, op = rng.randrange(6), rng.randrange(5)
        a = rng.randrange(12)
        b = a + 1 + rng.randrange(4)
        if op == 0:
            sets.update(f, [(a, b)])
            plain[f].update([(a, b)])
        elif op == 1:
            sets.add(f, a)
            plain[f].add(a)
        elif op == 2:
            sets.discard(f, a)
            plain[f].discard(a)
        elif op == 3:
            sets.difference_update(f, [(a, b)])
            plain[f].difference_update([(a, b)])
        else:
            assert sets.pop_first(f) == plain[f].pop_first()
        for g in range(6):
            assert sets.view(g) == plain[g]
            assert sets.nonempty(g) == bool(plain[g])
            assert all(sets.contains(g, x) == (x in plain[g]) for x in range(-1, 17))
    assert len(sets) == sum(bool(s) for s in plain.values())


def test_filesets_keep_a_prefix_as_an_int() -> None:
    sets = FileSets()
    for f in range(1000):
        sets.update(f, [(0, 1)])
    sets.add(5, 1)  # acked in order: still a prefix
    assert all(type(v) is int for v in sets._m.values())
    sets.add(7, 3)  # a gap: a real set for that file only
    assert isinstance(sets._m[7], RangeSet) and sets.view(7) == RangeSet([(0, 1), (3, 4)])


@pytest.mark.parametrize("n", [0, 1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 7])
def test_lazy_bodies_are_the_bytes_json_dumps_gives(n: int) -> None:
    entries = tuple(FileEntry(f"d/f{i}", "file", size=i, mtime_ns=10**18 + i, mode=0o644,
                              block_size=1 << 22) for i in range(n))
    up = C.OpenUpload("/", True, "t", entries, "diff", False, False)
    assert bytes(encode(up.to_json(lazy=True))) == json.dumps(up.to_json()).encode()
    commit = C.CommitRequest(tuple(C.CommitItem(i, f"b3blocks:{i:064x}") for i in range(n)))
    assert bytes(encode(commit.to_json(lazy=True))) == json.dumps(commit.to_json()).encode()
    plan = C.PlanRequest(tuple(C.PlanItem(i, "fresh", e) for i, e in enumerate(entries)))
    assert json.loads(encode(plan.to_json(lazy=True))) == plan.to_json()
    assert bytes(encode({"a": Items([1, 2], str), "b": {"c": [3]}})) == \
        json.dumps({"a": ["1", "2"], "b": {"c": [3]}}).encode()


def test_tree_paths_are_the_walked_paths(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    for rel in ("x", "a/y", "a/b/z"):
        (root / rel).write_bytes(b"1")
    os.symlink(root / "x", root / "a" / "link")
    tree = walk_source(root, 1 << 20)
    assert list(tree.paths) == [root / e.path if e.path else root for e in tree.entries]
    assert {p for p in tree.paths if p.is_file()} == \
        {root / "x", root / "a/y", root / "a/b/z", root / "a/link"}
    assert tree.paths[1:3] == [tree.paths[1], tree.paths[2]] and len(tree.paths) == 7
    one = walk_source(root / "x", 1 << 20)
    assert list(one.paths) == [root / "x"]

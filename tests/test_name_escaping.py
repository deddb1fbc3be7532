"""File names in text output are escaped; ``--json`` keeps them exact (trial: a name with
``\\n`` broke the list, ``$'\\e[2J\\e[31mevil'`` cleared the terminal and turned it red, in
``--dry-run``, the skip lines, error lines and names downloaded from the daemon)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fallback.progress import printable
from tests.conftest import PASSWORDS, Daemon

EVIL = "\x1b[2J\x1b[31mevil"
NL = "two\nlines.txt"


def test_printable_escapes_c0_c1_and_undecodable_bytes_only() -> None:
    assert printable(EVIL) == "\\x1b[2J\\x1b[31mevil"
    assert printable(NL) == "two\\nlines.txt"
    assert printable("a\x85b\x7f\u2028") == "a\\x85b\\x7f\\u2028"
    assert printable(os.fsdecode(b"bad\xff")) == "bad\\udcff"
    assert printable("café 東京 back\\slash") == "café 東京 back\\slash"


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    return subprocess.run(d.cli_args("transfer", *args), capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


def _clean(text: str) -> None:
    assert "\x1b" not in text and "two\nlines" not in text, text


def test_text_output_escapes_names_json_keeps_them(daemon: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / EVIL).write_text("x")
    (tree / NL).write_text("y")
    dry = _cli(daemon, str(tree), daemon.url("/up/"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    _clean(dry.stdout + dry.stderr)
    assert "  t/\\x1b[2J\\x1b[31mevil" in dry.stdout.splitlines(), dry.stdout
    assert "  t/two\\nlines.txt" in dry.stdout.splitlines(), dry.stdout
    up = _cli(daemon, str(tree), daemon.url("/up/"))
    assert up.returncode == 0, up.stderr
    again = _cli(daemon, str(tree), daemon.url("/up/"), "--overwrite", "never")
    assert again.returncode == 0, again.stderr
    _clean(again.stdout + again.stderr)
    assert "skipped t/two\\nlines.txt: exists" in again.stdout.splitlines(), again.stdout
    js = _cli(daemon, str(tree), daemon.url("/up/"), "--overwrite", "never", "--json")
    assert f"t/{NL}" in __import__("json").loads(js.stdout.splitlines()[-1])["skipped_files"]
    # names from the daemon: a download skipped as existing, and an error line
    down = tmp_path / "down"
    down.mkdir()
    (down / "t").mkdir()
    (down / "t" / EVIL).write_text("x")
    got = _cli(daemon, daemon.url("/up/t"), f"{down}/", "--overwrite", "never")
    assert got.returncode == 0, got.stderr
    _clean(got.stdout + got.stderr)
    assert "skipped t/\\x1b[2J\\x1b[31mevil: exists" in got.stdout.splitlines(), got.stdout
    bad = _cli(daemon, str(tmp_path / EVIL), daemon.url("/up/"))
    assert bad.returncode != 0
    _clean(bad.stderr)
    assert "\\x1b[2J\\x1b[31mevil" in bad.stderr, bad.stderr

"""Nothing in the repository points outside it: a user's clone is all a reader has, so the algorithm's
specification lives in docs/algorithm.md and no file cites a folder beside the checkout."""

from __future__ import annotations

import re
import subprocess

from paths import REPO

# spelled in pieces so that this file does not match itself
OUTSIDE = re.compile(
    r"\.\./"
    + "sha"
    + r"red\b|\b(?:"
    + "|".join(["TREE" + "PO", "DES" + "IGN", "PIT" + "FALLS", "STY" + "LE"])
    + r")\.md\b"
)


def _tracked_text_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file()]


def test_no_file_refers_to_a_path_outside_the_repository():
    hits = []
    for name in _tracked_text_files():
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, OSError):  # binary files (images)
            continue
        hits += [
            f"{name}:{n}: {line.strip()[:100]}"
            for n, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert not hits, "references outside the repository (cite docs/ instead):\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_looks_for():
    assert OUTSIDE.search("see ../" + "shared/x")
    assert OUTSIDE.search("rules in " + "TREE" + "PO.md")
    assert not OUTSIDE.search("docs/algorithm.md and /mnt/shared/models")

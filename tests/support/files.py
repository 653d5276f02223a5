"""Real files: a digest of a directory tree, to assert that an operation wrote nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`. The run lock is left out: taking and releasing
    it is not a change to the run."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }

"""Resolve `data.path` to what `datasets.load_dataset` needs, without importing datasets or torch.

Kept separate so the CLI can reject a missing or empty path before anything heavy is imported.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from tui_trainer.core.errors import ConfigError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DEFAULT_DATA = "sample_data"


@dataclass(frozen=True)
class DataSource:
    """A local set of files of one format, or a hub dataset name."""

    builder: str  # text | json | parquet | hub
    files: tuple[str, ...] = ()
    hub_name: str = ""
    skipped: tuple[str, ...] = ()  # files of a data.path directory that are not text data (.png, .csv, ...)

    @property
    def skipped_note(self) -> str:
        """What the run says about the files it left out of a directory ("" when none)."""
        if not self.skipped:
            return ""
        shown = ", ".join(self.skipped[:5]) + (f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else "")
        n = len(self.skipped)
        files = "1 file that is" if n == 1 else f"{n} files that are"
        return f"data.path: skipped {files} not .txt, .jsonl or .parquet: {shown}"

    @property
    def describe(self) -> str:
        if self.builder == "hub":
            return self.hub_name
        return self.files[0] if len(self.files) == 1 else f"{len(self.files)} {self.builder} files"


def shipped_sample_data() -> Path:
    """The corpus shipped with the package (wheel) or sitting at the repo root (editable install)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "sample_data", here.parent / "sample_data"):
        if candidate.is_dir():
            return candidate
    return here.parent / "sample_data"


def resolve_source(path: str) -> DataSource:
    """Files for a file, glob or directory; a hub name when nothing local matches and it looks like one."""
    raw = path.strip()
    if not raw:
        raise ConfigError("data.path: is empty; give a file, glob, directory or dataset name")
    p = Path(raw).expanduser()
    if raw == DEFAULT_DATA and not p.exists():
        p = shipped_sample_data()
    skipped: list[str] = []
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file())
        files = [str(f) for f in found if f.suffix in BUILDERS]
        if not files:
            raise ConfigError(f"data.path: directory {p} holds no .txt, .jsonl or .parquet files")
        # not silently: a .csv or a .png in a corpus dir is left out, and the run names it (skipped_note)
        skipped = [str(r) for f in found if f.suffix not in BUILDERS and not _hidden(r := f.relative_to(p))]
    elif p.is_file():
        files = [str(p)]
    elif glob.has_magic(raw):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise ConfigError(f"data.path: the pattern {raw!r} matches no files")
    elif HUB_ID_RE.match(raw) and Path(raw).suffix not in BUILDERS:
        return DataSource(builder="hub", hub_name=raw)
    else:
        raise ConfigError(f"data.path: no such file or directory: {raw}")
    suffixes = {Path(f).suffix for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise ConfigError(f"data.path: unsupported file type {sorted(unknown)[0]!r} (use .txt, .jsonl or .parquet)")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise ConfigError(f"data.path: mixes file types ({', '.join(sorted(suffixes))}); point it at one kind")
    empty = [f for f in files if Path(f).stat().st_size == 0]
    if len(empty) == len(files):
        raise ConfigError(f"data.path: {files[0] if len(files) == 1 else 'every file'} is empty")
    return DataSource(builder=builders.pop(), files=tuple(files), skipped=tuple(skipped))


def _hidden(relative: Path) -> bool:
    """.git/, .DS_Store, an editor's swap file: never data, not worth a word."""
    return any(part.startswith(".") for part in relative.parts)

"""Checkpoint manifests: checksums and sizes of every file, written last; verification."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.store.files import json_safe

# Format 2 records an xxh3-128 checksum per file (about ten times cheaper than sha256: a 1.5 GB checkpoint
# hashes in a fraction of a second); format 1 (sha256) checkpoints still verify and load.
FORMAT_VERSION = 2


READABLE_FORMATS = (1, 2)


HASH_KEY = "xxh3_128"


_HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


MANIFEST = "manifest.json"


TRAINER_STATE = "trainer_state.json"


CHECKPOINT_PREFIX = "step-"


def checkpoint_dirname(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def hash_file(path: Path, algorithm: str = HASH_KEY) -> str:
    """Checksum of a file's bytes; both hashers release the GIL on big buffers, so other threads run."""
    digest = _HASHERS[algorithm]()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


def write_manifest(
    directory: Path, meta: dict[str, Any], known: dict[str, tuple[str, int]] | None = None
) -> dict[str, Any]:
    """Hash every file in `directory` and write manifest.json LAST (fsynced); returns the manifest.
    `known` holds (xxh3_128, size) of files hashed while they were written, so they are not read again."""
    files = {}
    known = known or {}
    for entry in sorted(directory.iterdir()):
        if entry.name == MANIFEST or not entry.is_file():
            continue
        digest, size = known[entry.name] if entry.name in known else (hash_file(entry), entry.stat().st_size)
        files[entry.name] = {HASH_KEY: digest, "size": size}
    manifest = {"format": FORMAT_VERSION, **json_safe(meta), "files": files}
    with open(directory / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointInvalid(f"{path}: missing manifest") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointInvalid(f"{path}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointInvalid(f"{path}: manifest has no file list")
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointInvalid(f"{path}: unsupported checkpoint format {manifest.get('format')!r}")
    return manifest


def verify_checkpoint(directory: Path, *, deep: bool = True) -> dict[str, Any]:
    """Raise CheckpointInvalid naming the first bad file; `deep=False` checks sizes only (no hashing)."""
    manifest = read_manifest(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointInvalid(f"{path}: missing file listed in the manifest") from None
        if size != entry.get("size"):
            raise CheckpointInvalid(f"{path}: size {size} bytes, manifest says {entry.get('size')}")
        if deep:
            algorithm = HASH_KEY if HASH_KEY in entry else "sha256"  # format 1 manifests hold sha256
            if hash_file(path, algorithm) != entry.get(algorithm):
                raise CheckpointInvalid(f"{path}: {algorithm} does not match the manifest (file is corrupt)")
    return manifest


def same_manifest(directory: Path, verified: dict[str, Any]) -> bool:
    """True when `directory` still holds the manifest verified earlier and every file has its listed size:
    lets a load skip a second full hashing pass right after a plan verified the checkpoint."""
    try:
        manifest = verify_checkpoint(directory, deep=False)
    except CheckpointInvalid:
        return False
    return manifest == verified

"""Checkpoint manifests: checksums and sizes of every file, written last; verification."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from tui_trainer.core.errors import CheckpointDeleted, CheckpointInvalid
from tui_trainer.core.store.files import UnsafeFile, json_safe, open_regular, read_json
from tui_trainer.core.store.schema import Damaged, check_manifest

# Format 2 records an xxh3-128 checksum per file (about ten times cheaper than sha256: a 1.5 GB checkpoint
# hashes in a fraction of a second); format 1 (sha256) checkpoints still verify and load.
FORMAT_VERSION = 2


READABLE_FORMATS = (1, 2)


HASH_KEY = "xxh3_128"


_HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


MANIFEST = "manifest.json"


TRAINER_STATE = "trainer_state.json"  # Hugging Face's schema since 0.2 (HF Trainer resumes our checkpoints)


OWN_STATE = "tui_trainer_state.json"  # our own trainer state; older checkpoints kept it in trainer_state.json


CHECKPOINT_PREFIX = "step-"


def checkpoint_dirname(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def hash_file(path: Path, algorithm: str = HASH_KEY) -> str:
    """Checksum of a file's bytes; both hashers release the GIL on big buffers, so other threads run."""
    digest = _HASHERS[algorithm]()
    with os.fdopen(open_regular(path), "rb") as fh:  # never a symlink out, a FIFO or a device
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
        manifest = read_json(path)
    except FileNotFoundError:
        _raise_if_deleted(directory)
        raise CheckpointInvalid(f"{path}: missing manifest") from None
    except UnsafeFile as exc:
        raise CheckpointInvalid(f"{path}: {exc.strerror}") from None
    except ValueError:
        raise CheckpointInvalid(f"{path}: manifest is not valid JSON") from None
    try:
        check_manifest(manifest, tuple(_HASHERS))
    except Damaged as exc:
        raise CheckpointInvalid(f"{path}: {exc}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointInvalid(f"{path}: unsupported checkpoint format {manifest.get('format')!r}")
    return manifest


def verify_checkpoint(directory: Path, *, deep: bool = True) -> dict[str, Any]:
    """Raise CheckpointInvalid naming the first bad file; `deep=False` checks sizes only (no hashing)."""
    with read_lease(directory):
        manifest = read_manifest(directory)
        for name, entry in manifest["files"].items():
            path = directory / name  # a plain name (schema.py): never outside the checkpoint dir
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                _raise_if_deleted(directory)
                raise CheckpointInvalid(f"{path}: missing file listed in the manifest") from None
            if not stat.S_ISREG(info.st_mode):  # a link, FIFO or device is never read (it could hang or leak)
                raise CheckpointInvalid(f"{path}: not a regular file")
            if info.st_size != entry.get("size"):
                raise CheckpointInvalid(f"{path}: size {info.st_size} bytes, manifest says {entry.get('size')}")
            if deep:
                algorithm = HASH_KEY if HASH_KEY in entry else "sha256"  # format 1 manifests hold sha256
                try:
                    digest = hash_file(path, algorithm)
                except FileNotFoundError:
                    _raise_if_deleted(directory)
                    raise CheckpointInvalid(f"{path}: missing file listed in the manifest") from None
                except UnsafeFile as exc:
                    raise CheckpointInvalid(f"{path}: {exc.strerror}") from None
                if digest != entry.get(algorithm):
                    raise CheckpointInvalid(f"{path}: {algorithm} does not match the manifest (file is corrupt)")
        return manifest


# ---------------------------------------------------------------- readers and retention
# Retention on a live run deletes checkpoints while other processes read them (verify, export, branch). A
# reader holds a shared flock on the checkpoint's manifest.json for as long as it reads; retention takes an
# exclusive one without waiting, and skips (until its next pass) a checkpoint that someone is reading. A
# checkpoint that is gone anyway (deleted before the reader got there) raises CheckpointDeleted, never a
# "corrupt" or "missing file" that is not true.


def _raise_if_deleted(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointDeleted(f"{directory}: deleted by retention while being read")


@contextlib.contextmanager
def read_lease(directory: Path) -> Iterator[None]:
    """Hold `directory` against retention while reading it. Without a manifest (an invalid or HF checkpoint)
    there is nothing to hold: the read goes ahead and reports what it finds."""
    try:
        fd = open_regular(directory / MANIFEST)
    except FileNotFoundError:
        _raise_if_deleted(directory)
        yield
        return
    except UnsafeFile:
        yield  # read_manifest names the problem
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while retention renames (milliseconds)
        try:
            same = os.stat(directory / MANIFEST).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # retention renamed it away while we waited
            raise CheckpointDeleted(f"{directory}: deleted by retention while being read")
        yield
    finally:
        os.close(fd)


def claim_for_deletion(directory: Path) -> int | None:
    """Retention's side of the lease: an fd holding the exclusive lock (close it after deleting), or None
    when a reader holds the checkpoint now (try again at the next pass). No manifest: nothing to hold."""
    try:
        fd = open_regular(directory / MANIFEST)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def own_state_path(directory: Path) -> Path:
    """Where a checkpoint keeps our trainer state: its own file, or trainer_state.json in older ones."""
    own = directory / OWN_STATE
    return own if own.exists() else directory / TRAINER_STATE


def same_manifest(directory: Path, verified: dict[str, Any]) -> bool:
    """True when `directory` still holds the manifest verified earlier and every file has its listed size:
    lets a load skip a second full hashing pass right after a plan verified the checkpoint."""
    try:
        manifest = verify_checkpoint(directory, deep=False)
    except CheckpointInvalid:
        return False
    return manifest == verified

"""The one schema of the store's JSON records: run.json and a checkpoint's manifest.json, with types and
ranges. Every file under the runs dir is untrusted input (ARCHITECTURE.md, "Threat model"): a record that
fails here is reported as damaged in one line naming the file and the field, never as a traceback in some
reader far away (`"parent": "x"` once stopped every live training at its next retention pass)."""

from __future__ import annotations

import math
import re
from typing import Any

RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no "$" newline loophole


class Damaged(ValueError):
    """A record that does not fit the schema; the message names the field."""


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int to Python, never to the schema


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _field(record: dict[str, Any], key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise Damaged(f"{key} is {_show(record.get(key))}, expected {expected}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(record: Any) -> dict[str, Any]:
    """run.json as the store reads it: returns it unchanged, or raises Damaged naming the bad field.
    Optional fields may be absent (older runs); present ones must have their type."""
    if not isinstance(record, dict):
        raise Damaged(f"not a JSON object (a {type(record).__name__})")
    get = record.get
    _field(record, "name", get("name") is None or isinstance(get("name"), str), "a string")
    _field(record, "created", get("created") is None or _is_number(get("created")), "a time in seconds")
    _field(record, "config", get("config") is None or isinstance(get("config"), dict), "a table")
    _field(record, "status", get("status") is None or isinstance(get("status"), str), "a string")
    parent = get("parent")
    ok = parent is None or (
        isinstance(parent, dict)
        and isinstance(parent.get("run"), str)
        and RUN_NAME_RE.fullmatch(parent["run"]) is not None
        and _is_int(parent.get("step"))
        and parent["step"] >= 0
    )
    _field(record, "parent", ok, "null or {run: NAME, step: N}")
    pinned = get("pinned", [])
    _field(record, "pinned", isinstance(pinned, list) and all(_is_int(s) and s >= 0 for s in pinned), "a list of steps")
    world = get("world_size", 1)
    _field(record, "world_size", _is_int(world) and world >= 1, "a whole number >= 1")
    restarts = get("restarts", 0)
    _field(record, "restarts", _is_int(restarts) and restarts >= 0, "a whole number >= 0")
    _field(record, "auto_resume", type(get("auto_resume", False)) is bool, "true or false")
    launch = get("launch", {})  # the supervisor's job ids (core/launch.py job_identity)
    ok = isinstance(launch, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in launch.items())
    _field(record, "launch", ok, "a table of strings")
    # run_id is the control channel's (runs.read_run_id checks it): a bad one means no id, not a damaged run
    return record


def plain_file_name(name: str) -> bool:
    """A manifest entry names a file directly inside its checkpoint dir: no path, no '..', no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def check_manifest(manifest: Any, hash_keys: tuple[str, ...]) -> dict[str, Any]:
    """manifest.json: {"format", "files": {NAME: {HASH: hex, "size": N}}, step/created/losses...}; returns
    it unchanged, or raises Damaged naming the bad entry."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise Damaged("manifest has no file list")
    for name, entry in manifest["files"].items():
        if not plain_file_name(name):
            raise Damaged(f"manifest lists {_show(name)}, not a plain file name in the checkpoint dir")
        if not isinstance(entry, dict) or not _is_int(entry.get("size")) or entry["size"] < 0:
            raise Damaged(f"manifest entry {name!r} has no size")
        if not any(isinstance(entry.get(key), str) for key in hash_keys):
            raise Damaged(f"manifest entry {name!r} has no checksum")
    for key in ("created", "loss", "eval_loss"):
        value = manifest.get(key)
        _field(manifest, key, value is None or type(value) in (int, float), "a number or null")
    for key in ("step", "eval_step"):
        value = manifest.get(key)
        _field(manifest, key, value is None or (_is_int(value) and value >= 0), "a whole number >= 0")
    return manifest

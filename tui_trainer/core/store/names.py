"""Who a run is: its name (checked before it becomes a path), a ref RUN or RUN@STEP, and its random id."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path

from tui_trainer.core.errors import UserError
from tui_trainer.core.store.schema import RUN_NAME_RE

RUN_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_run_id() -> str:
    """A random id for a new run's record: the control channel's hello names it, so a client can tell the
    run it asked for from a copy of its dir or another run of the same name (control/protocol.py)."""
    return secrets.token_hex(16)


def read_run_id(run_dir: Path) -> str | None:
    """The run id in `run_dir`'s run.json; None for a run made before ids (or no readable record)."""
    try:  # no symlink, FIFO or device: the control server's thread reads this and must never block on it
        fd = os.open(run_dir / "run.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            record = json.loads(f.read(64 * 1024 * 1024))
    except (OSError, ValueError):
        return None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) else None


def validate_run_name(name: str) -> str:
    if "/" in name or "\\" in name or os.sep in name:
        raise UserError(f"run name {name!r}: must not contain a path separator")
    if not RUN_NAME_RE.fullmatch(name):  # fullmatch: "$" would let a trailing newline through
        raise UserError(
            f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'RUN' -> (RUN, None); 'RUN@STEP' -> (RUN, STEP). Raises UserError on anything else."""
    name, sep, step = ref.partition("@")
    if sep and not re.fullmatch(r"\d+", step):
        raise UserError(f"{ref!r}: expected RUN or RUN@STEP with STEP a whole number")
    validate_run_name(name)
    return name, int(step) if sep else None

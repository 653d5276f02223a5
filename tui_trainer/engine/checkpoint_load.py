"""Load a checkpoint into a model, optimizer and scaler, verified on read (ARCHITECTURE.md: the on-disk
contract). Nothing is unpickled as code: weights come from safetensors, the rest from
torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.hf_runs import is_hf_checkpoint
from tui_trainer.core.store import MANIFEST, own_state_path, same_manifest, verify_checkpoint
from tui_trainer.engine.checkpoint_save import WEIGHTS
from tui_trainer.engine.hf_state import from_hf_state


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build a model without initialising weights that a checkpoint is about to overwrite."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights():
        yield


def _safe_load(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for a planted payload, RuntimeError for a torn file
        raise CheckpointInvalid(f"{path}: refused to load ({str(exc).splitlines()[0]})") from None


@dataclass
class LoadedState:
    trainer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    # one per rank (a list) under DDP; None: a Hugging Face checkpoint, whose RNG cannot continue here
    rng_state: dict[str, Any] | list[dict[str, Any]] | None


def load_into(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    verified: dict[str, Any] | None = None,
) -> LoadedState:
    """Verify, then load weights and optimizer/scaler state in place; returns what the loop restores itself.
    `verified` is the manifest a plan just hashed: if the checkpoint still holds it (same manifest, same
    sizes) the files are not hashed a second time."""
    foreign = not (path / MANIFEST).exists() and is_hf_checkpoint(path)
    if not foreign and (verified is None or not same_manifest(path, verified)):
        verify_checkpoint(path)
    try:
        weights = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as exc:
        raise CheckpointInvalid(f"{path / WEIGHTS}: cannot read weights ({exc})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise CheckpointInvalid(
            f"{path / WEIGHTS}: does not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    optimizer.load_state_dict(_safe_load(path / "optimizer.pt", device))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(_safe_load(path / "scaler.pt"))
    state_path = own_state_path(path)
    try:
        trainer_state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{state_path}: unreadable ({exc})") from None
    scheduler_state = _safe_load(path / "scheduler.pt") if (path / "scheduler.pt").exists() else {}
    if foreign:
        return LoadedState(from_hf_state(trainer_state), scheduler_state, None)
    return LoadedState(
        trainer_state=trainer_state,
        scheduler_state=scheduler_state,
        rng_state=_safe_load(path / "rng.pt"),
    )

"""Hugging Face Trainer output dirs as runs of the store, read-only (torch-free, found by their files).

An output dir holds checkpoint-N/ folders, each with HF's trainer_state.json and the model's weights. Placed
(or symlinked) in the runs dir it is a run: its curve is the newest trainer_state.json's log_history, its
checkpoint-N folders are checkpoints without a manifest, and nothing in it is ever written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HF_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
NO_MANIFEST = "no manifest (a Hugging Face Trainer checkpoint: files are not checksummed)"
CROSS_FRAMEWORK = (
    "{ref} is a Hugging Face Trainer checkpoint: weights, optimizer and scheduler state carry over, but the data "
    "order and the random state cannot continue exactly across frameworks"
)


def is_hf_checkpoint(directory: Path) -> bool:
    return (
        HF_CHECKPOINT_RE.match(directory.name) is not None
        and (directory / "trainer_state.json").is_file()
        and any((directory / name).is_file() for name in WEIGHT_FILES)
    )


def hf_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint-N folders in `run_dir`, oldest first."""
    found = []
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = HF_CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and is_hf_checkpoint(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def is_hf_output_dir(directory: Path) -> bool:
    """An HF Trainer output dir that is not one of our runs (no run.json)."""
    return directory.is_dir() and not (directory / "run.json").exists() and bool(hf_checkpoints(directory))


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json ({} when unreadable: the run still lists)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


# Our model keys and the names transformers' configs give them (GPT-2's own first, then the common ones).
MODEL_KEYS = {
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_embd": ("n_embd", "hidden_size"),
    "n_kv_head": ("num_key_value_heads",),
    "block_size": ("n_positions", "max_position_embeddings"),
    "vocab_size": ("vocab_size",),
    "dropout": ("resid_pdrop", "attention_dropout", "hidden_dropout"),
}


def _model_config(checkpoint: Path) -> dict[str, Any]:
    """Our config's model section from the checkpoint's config.json (any family's shape), so a branch from
    it records the model it trains and a changed shape is refused as for our own runs."""
    try:
        hf = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(hf, dict):
        return {}
    model: dict[str, Any] = {}
    if isinstance(hf.get("model_type"), str):
        model["arch"] = hf["model_type"]
    for ours, names in MODEL_KEYS.items():
        value = next(
            (hf[n] for n in names if isinstance(hf.get(n), (int, float)) and not isinstance(hf[n], bool)), None
        )
        if value is not None and (ours == "dropout" or isinstance(value, int)):
            model[ours] = value
    return {"model": model} if model else {}


def hf_record(run_dir: Path) -> dict[str, Any]:
    """What run.json would say about an HF output dir."""
    checkpoints = hf_checkpoints(run_dir)
    newest = checkpoints[-1][1] if checkpoints else run_dir
    return {
        "name": run_dir.name,
        "created": min((p.stat().st_mtime for _, p in checkpoints), default=0.0),
        "config": _model_config(newest),
        "parent": None,
        "status": "hf trainer",
        "pinned": [],
        "hf": True,
    }


def log_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """HF log_history entries as our metrics records (step, loss, lr, grad_norm, eval_loss)."""
    out = []
    for entry in state.get("log_history") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        record: dict[str, Any] = {"step": entry["step"]}
        for theirs, ours in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm")):
            if isinstance(entry.get(theirs), (int, float)):
                record[ours] = float(entry[theirs])
        if isinstance(entry.get("eval_loss"), (int, float)):
            record["eval_loss"] = float(entry["eval_loss"])
        if len(record) > 1:
            out.append(record)
    return out


def hf_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's curve: the log_history of its newest checkpoint (or the dir's own trainer_state.json,
    which `trainer.save_state()` writes at the end, when it reaches further)."""
    states = [read_state(path) for _, path in hf_checkpoints(run_dir)[-1:]] + [read_state(run_dir)]
    best = max(states, key=lambda s: s.get("global_step", -1) if isinstance(s.get("global_step"), int) else -1)
    return log_records(best)


def checkpoint_losses(checkpoint: Path, step: int) -> tuple[float | None, float | None]:
    """(train loss, eval loss) logged at the checkpoint's own step."""
    loss = eval_loss = None
    for record in log_records(read_state(checkpoint)):
        if record["step"] == step:
            loss = record.get("loss", loss)
            eval_loss = record.get("eval_loss", eval_loss)
    return loss, eval_loss

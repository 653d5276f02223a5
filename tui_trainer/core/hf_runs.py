"""Hugging Face Trainer output dirs as runs of the store, read-only (torch-free, found by their files).

An output dir holds checkpoint-N/ folders, each with HF's trainer_state.json and the model's weights. Placed
(or symlinked) in the runs dir it is a run: its curve is the newest trainer_state.json's log_history, its
checkpoint-N folders are checkpoints without a manifest, and nothing in it is ever written.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from tui_trainer.core.store.files import read_bytes, read_json

HF_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
NO_MANIFEST = "no manifest (a Hugging Face Trainer checkpoint: files are not checksummed)"
# what a run continuing an HF checkpoint should take from the HF run; each one it did not record is named
SETTINGS = ("data.path", "optim.lr", "optim.warmup_steps", "optim.weight_decay", "train.batch_size", "train.grad_accum")
# TrainingArguments' defaults, assumed for what an HF run did not record (a better guess than ours for a run
# the HF Trainer made); HF's schedules decay to 0
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "optim": {"lr": 5e-5, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.0, "betas": [0.9, 0.999]},
    "train": {"batch_size": 8, "grad_accum": 1, "seed": 42},
}
UNKNOWN_NOTE = "{ref}: the HF run did not record {keys}; assumed (set them with --set)"
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
        state = read_json(checkpoint / "trainer_state.json")  # no link, FIFO or device (files.py)
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


def read_config_json(checkpoint: Path) -> dict[str, Any]:
    """The model's config.json in a checkpoint ({} when unreadable)."""
    try:
        hf = read_json(checkpoint / "config.json")
    except (OSError, ValueError):
        return {}
    return hf if isinstance(hf, dict) else {}


def model_section(hf: dict[str, Any]) -> dict[str, Any]:
    """Our config's model section from a config.json's keys (any family's: its model_type, shape, vocab and
    dropout), so a run continuing the checkpoint records the model it trains and a changed shape is refused
    as for our own runs."""
    model: dict[str, Any] = {}
    if isinstance(hf.get("model_type"), str):
        model["arch"] = hf["model_type"]
    for ours, names in MODEL_KEYS.items():
        value = next(
            (hf[n] for n in names if isinstance(hf.get(n), (int, float)) and not isinstance(hf[n], bool)), None
        )
        if value is not None and (ours == "dropout" or isinstance(value, int)):
            model[ours] = value
    return model


_MAX_SCHEDULER_PICKLE = 1 << 20


class _PlainUnpickler(pickle.Unpickler):
    """Python's own values only: every global (a class, a function) and every persistent id (a tensor) is
    refused, so nothing in the file can run code. Enough for a LambdaLR's scheduler.pt."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a tensor is not a plain value")


def _peak_lr(checkpoint: Path) -> float | None:
    """The learning rate the HF run's schedule scales (its LambdaLR's base_lrs: the script's learning_rate),
    from scheduler.pt (a torch zip holding one pickle of plain numbers), read without torch or any code."""
    try:
        data = read_bytes(checkpoint / "scheduler.pt", limit=_MAX_SCHEDULER_PICKLE)  # no link, FIFO or device
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
            if info.file_size > _MAX_SCHEDULER_PICKLE:  # a scheduler state is a few hundred bytes
                return None
            state = _PlainUnpickler(io.BytesIO(archive.read(info))).load()
    except Exception:  # absent, not a zip, not plain values: the lr is unknown, the run still branches
        return None
    base = state.get("base_lrs") if isinstance(state, dict) else None
    if not isinstance(base, list) or not base or not all(isinstance(x, float) and 0 < x <= 1 for x in base):
        return None
    return float(max(base))


def run_settings(run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """What an HF output dir itself says about how it trained, as our config's sections: batch size, max
    steps and save cadence from trainer_state.json, the peak lr from scheduler.pt (HF's schedules decay to 0:
    min_lr 0). training_args.bin holds the rest but is a pickle of arbitrary objects: never read."""
    state = read_state(checkpoint)
    train: dict[str, Any] = {}
    if isinstance(state.get("train_batch_size"), int) and state["train_batch_size"] > 0:
        train["batch_size"] = state["train_batch_size"]
    if isinstance(state.get("max_steps"), int) and state["max_steps"] > 0:
        train["max_steps"] = state["max_steps"]
    settings: dict[str, Any] = {"train": train} if train else {}
    if isinstance(state.get("save_steps"), int) and state["save_steps"] > 0:
        settings["checkpoint"] = {"every_steps": state["save_steps"]}
    lr = _peak_lr(checkpoint)
    if lr is not None:
        settings["optim"] = {"lr": lr, "min_lr": 0.0}
    return settings


def start_config(recorded: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The config a run continuing an HF checkpoint starts from: the run's recorded settings (a callback
    run's, or an output dir's own), with the model section taken from the checkpoint's config.json, the one
    thing certain to match its weights."""
    config = {section: dict(values) for section, values in HF_DEFAULTS.items()}
    for section, values in recorded.items():
        if isinstance(values, dict):
            config[section] = {**config.get(section, {}), **values}
    model = model_section(read_config_json(checkpoint))
    if model:
        config["model"] = {**config.get("model", {}), **model}
    return config


def unknown_settings(recorded: dict[str, Any], overrides: list[str]) -> list[str]:
    """`key=value` for each setting a run continuing an HF checkpoint assumes: the HF run did not record it
    and the user did not set it (the value: TrainingArguments' default, or ours for the data)."""
    given = {o.partition("=")[0].strip() for o in overrides}
    out = []
    for key in SETTINGS:
        section, _, name = key.partition(".")
        if key in given or name in recorded.get(section, {}):
            continue
        value = HF_DEFAULTS.get(section, {}).get(name, "tui-trainer's default")
        out.append(f"{key}={value}")
    return out


def hf_record(run_dir: Path) -> dict[str, Any]:
    """What run.json would say about an HF output dir."""
    checkpoints = hf_checkpoints(run_dir)
    newest = checkpoints[-1][1] if checkpoints else run_dir
    return {
        "name": run_dir.name,
        "created": min((p.stat().st_mtime for _, p in checkpoints), default=0.0),
        "config": {**run_settings(run_dir, newest), "model": model_section(read_config_json(newest))}
        if checkpoints
        else {},
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

"""The parts of a checkpoint written in the Hugging Face Trainer's formats, so `Trainer.train(
resume_from_checkpoint=...)` resumes one of ours: trainer_state.json (its TrainerState schema) and
rng_state.pth, or rng_state_{rank}.pth per rank under DDP (its RNG layout). Our own exact-resume state stays
in tui_trainer_state.json and rng.pt.

model.safetensors, optimizer.pt and scheduler.pt need no translation: the weights are a plain HF model
dir, AdamW's param groups are HF's (decay, then no-decay, engine/model.py) and scheduler.pt is a LambdaLR's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

HF_RNG = "rng_state.pth"

# TrainerState's fields in every transformers this project supports (>= 4.44): a key it does not know
# makes TrainerState(**json) fail, so nothing newer (e.g. best_global_step) is written.
_HF_DEFAULTS: dict[str, Any] = {
    "best_metric": None,
    "best_model_checkpoint": None,
    "eval_steps": 500,
    "is_hyper_param_search": False,
    "is_local_process_zero": True,
    "is_world_process_zero": True,
    "num_input_tokens_seen": 0,
    "num_train_epochs": 1,
    "total_flos": 0.0,
    "trial_name": None,
    "trial_params": None,
}

# HF's Trainer writes its TrainerControl's state into every checkpoint and, at its next save, updates that
# entry in place: without one, a Trainer that resumed from our checkpoint fails at its first save
# (KeyError 'TrainerControl'). Its flags are all off between steps.
_TRAINER_CONTROL = {
    "args": {
        "should_training_stop": False,
        "should_epoch_stop": False,
        "should_save": False,
        "should_evaluate": False,
        "should_log": False,
    },
    "attributes": {},
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def log_history(records: list[dict[str, Any]], step: int, epoch: float) -> list[dict[str, Any]]:
    """Our metrics up to `step` as HF log entries (train: loss, learning_rate; eval: eval_loss)."""
    out: list[dict[str, Any]] = []
    for r in records:
        at = r.get("step")
        if not isinstance(at, int) or at > step or at <= 0:
            continue
        # HF logs the epoch as a fraction; ours is the data cursor's epoch, scaled along the steps
        entry: dict[str, Any] = {"epoch": epoch * at / step if step else 0.0, "step": at}
        if _finite(r.get("loss")):
            entry["loss"] = float(r["loss"])
            if _finite(r.get("lr")):
                entry["learning_rate"] = float(r["lr"])
            if _finite(r.get("grad_norm")):
                entry["grad_norm"] = float(r["grad_norm"])
        elif _finite(r.get("eval_loss")):
            entry["eval_loss"] = float(r["eval_loss"])
        else:
            continue
        out.append(entry)
    return out


def hf_trainer_state(own: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """HF's TrainerState as JSON, from our trainer state and metrics (the run's curve up to this step)."""
    step = int(own["step"])
    config = own.get("config") or {}
    train, ckpt = config.get("train", {}), config.get("checkpoint", {})
    epoch = float(own.get("epoch", 0))
    best = own.get("best_eval_loss")
    return {
        **_HF_DEFAULTS,
        "best_metric": float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None,
        "epoch": epoch,
        "eval_steps": int(train.get("eval_every") or 500),
        "global_step": step,
        "log_history": log_history(records, step, epoch),
        "logging_steps": int(train.get("log_every") or 1),
        "max_steps": int(train.get("max_steps") or step),
        "num_input_tokens_seen": int(own.get("tokens", 0)),
        "save_steps": int(ckpt.get("every_steps") or 500),
        "train_batch_size": int(train.get("batch_size") or 1),
        "stateful_callbacks": {"TrainerControl": copy.deepcopy(_TRAINER_CONTROL)},
    }


def from_hf_state(hf: dict[str, Any]) -> dict[str, Any]:
    """An HF TrainerState as our trainer state: its step and tokens; the data cursor starts a fresh epoch
    (HF's sampler order cannot be reproduced by ours)."""
    return {
        "step": int(hf.get("global_step", 0)),
        "tokens": int(hf.get("num_input_tokens_seen") or 0),
        "epoch": 0,
        "position": 0,
    }


def hf_rng_files(states: dict[str, Any] | list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """HF Trainer's RNG files (its _save_rng_state) from our rng states (engine/rng.py): one process writes
    rng_state.pth with the current CUDA device's state; under DDP (a list, one state per rank) each rank gets
    rng_state_{rank}.pth with every device's state, which is what its _load_rng_state reads on that rank."""
    if isinstance(states, list):
        return {f"rng_state_{rank}.pth": _hf_layout(state, distributed=True) for rank, state in enumerate(states)}
    return {HF_RNG: _hf_layout(states, distributed=False)}


def _hf_layout(state: dict[str, Any], *, distributed: bool) -> dict[str, Any]:
    version, internal, gauss = state["python"]
    n = state["numpy"]
    out: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]),
        "cpu": state["torch"],
    }
    if state["cuda"]:
        out["cuda"] = list(state["cuda"]) if distributed else state["cuda"][torch.cuda.current_device()]
    return out


def _numpy_globals() -> list[Any]:
    """What unpickling np.random.get_state()'s tuple needs: an ndarray of uint32, nothing else."""
    core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core  # type: ignore[attr-defined]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def numpy_rng_globals() -> Iterator[None]:
    """torch.load(weights_only=True) of an rng_state.pth: allow-list only numpy's RNG state types."""
    with torch.serialization.safe_globals(_numpy_globals()):
        yield


def load_hf_rng(path: Path) -> dict[str, Any]:
    with numpy_rng_globals():
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state

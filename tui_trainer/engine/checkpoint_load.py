"""Load a checkpoint, verified on read, into the run's checkpoint components (engine/components.py), and
the checks every load makes (ARCHITECTURE.md: the on-disk contract). Nothing is unpickled as code: weights
come from safetensors, the rest from torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.hf_runs import is_hf_checkpoint
from tui_trainer.core.store import MANIFEST, own_state_path, read_lease, same_manifest, verify_checkpoint
from tui_trainer.engine.checkpoint_files import WEIGHTS
from tui_trainer.engine.components import Components
from tui_trainer.engine.hf_state import from_hf_state
from tui_trainer.engine.rng import restore_rng, rng_state


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


class CheckpointReader:
    """A checkpoint as the components read it (engine/components.py): verified once on open, every pickled
    file read with weights_only=True, the trainer state parsed and checked once. A Hugging Face Trainer's
    checkpoint (no manifest, `foreign`) reads too: its trainer_state.json converted, and no RNG of ours."""

    def __init__(self, path: Path, device: torch.device, verified: dict[str, Any] | None = None) -> None:
        self.path, self.device = path, device
        self.foreign = not (path / MANIFEST).exists() and is_hf_checkpoint(path)
        # `verified`: the manifest a plan just hashed; if the checkpoint still holds it, it is not hashed again
        if not self.foreign and (verified is None or not same_manifest(path, verified)):
            verify_checkpoint(path)
        self._trainer_state: dict[str, Any] | None = None

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def pickled(self, name: str, *, on_device: bool = False) -> Any:
        return _safe_load(self.path / name, self.device if on_device else "cpu")

    @property
    def trainer_state(self) -> dict[str, Any]:
        """tui_trainer_state.json (or an HF TrainerState converted): counters, data cursor, the run's record."""
        if self._trainer_state is None:
            self._trainer_state = _read_trainer_state(self.path, self.foreign)
        return self._trainer_state


def _read_trainer_state(path: Path, foreign: bool) -> dict[str, Any]:
    state_path = own_state_path(path)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{state_path}: unreadable ({exc})") from None
    if foreign:
        _check(state_path, isinstance(state, dict), "not a JSON object")
        try:
            return from_hf_state(state)
        except (TypeError, ValueError) as exc:
            raise CheckpointInvalid(f"{state_path}: not a trainer state ({exc})") from None
    check_trainer_state(state_path, state)
    return dict(state)


def load(
    path: Path, components: Components, device: torch.device, verified: dict[str, Any] | None = None
) -> CheckpointReader:
    """Verify the checkpoint, then load every component from it in registration order; returns the reader
    (its trainer_state is what the caller may still want: the data recipe, the base reference). Retention on
    a live run waits until the load is done."""
    with read_lease(path):
        reader = CheckpointReader(path, device, verified)
        components.load(reader)
        return reader


def load_weights(path: Path, model: torch.nn.Module, device: torch.device) -> None:
    """model.safetensors into the model, every tensor accounted for (strict up to tied weights)."""
    try:
        weights = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as exc:
        raise CheckpointInvalid(f"{path / WEIGHTS}: cannot read weights ({exc})") from None
    check_fits(path / WEIGHTS, model, {k: tuple(v.shape) for k, v in weights.items()})
    model.load_state_dict(weights, strict=False)  # strictness checked above (tied weights are not saved)


# ---------------------------------------------------------------- what every load checks
# A checkpoint whose manifest was rewritten to match tampered files verifies: these checks are what stands
# between such a file and a traceback, a run that fails steps later, or a silently different model. Each
# raises CheckpointInvalid naming the file (one line, exit 2), before anything is written.


def _check(path: Path, ok: bool, problem: str) -> None:
    if not ok:
        raise CheckpointInvalid(f"{path}: {problem}")


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def fit_problem(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> str:
    """ "" when every tensor in `shapes` has a home of that shape in `model` and every parameter and
    persistent buffer gets one (a weight tied to one that is present, e.g. GPT-2's lm_head, needs none);
    else what does not fit."""
    own = model.state_dict(keep_vars=True)
    present = {id(own[k]) for k in shapes if k in own}
    missing = [k for k, v in own.items() if k not in shapes and id(v) not in present]
    unexpected = [k for k in shapes if k not in own]
    wrong = [k for k, shape in shapes.items() if k in own and tuple(own[k].shape) != tuple(shape)]
    parts = [f"missing {_few(missing)}"] if missing else []
    parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
    parts += [f"{k} is {list(shapes[k])}, the model's {list(own[k].shape)}" for k in sorted(wrong)[:2]]
    return "; ".join(parts)


def check_fits(source: Path, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    problem = fit_problem(model, shapes)
    _check(source, not problem, f"does not fit the model ({problem})")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from the safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:
        raise CheckpointInvalid(f"{path}: cannot read weights ({str(exc).splitlines()[0]})") from None


def check_config_fits_weights(path: Path) -> None:
    """config.json describes exactly the model the weights fill: a config edited from 2 to 4 layers would
    otherwise build a model whose two extra layers stay randomly initialised (export, generate), or pass
    unnoticed (resume). The model is built on the meta device: no memory, milliseconds."""
    from tui_trainer.engine.models import meta_model

    config_path = path / "config.json"
    try:
        model = meta_model(path)
    except Exception as exc:
        raise CheckpointInvalid(f"{config_path}: cannot build a model from it ({str(exc).splitlines()[0]})") from None
    problem = fit_problem(model, weight_shapes(path / WEIGHTS))
    _check(config_path, not problem, f"does not match the weights ({problem})")


def check_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Same groups, same parameter count per group, and every per-parameter tensor (AdamW's moments) shaped
    like its parameter: torch checks only the counts, and a wrong shape would fail at the first step."""
    _check(path, isinstance(state, dict), "not an optimizer state")
    groups, saved = optimizer.param_groups, state.get("param_groups")
    _check(path, isinstance(saved, list) and isinstance(state.get("state"), dict), "not an optimizer state")
    ok = len(saved) == len(groups) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(own["params"])
        for g, own in zip(saved, groups, strict=False)
    )
    _check(path, ok, "holds parameter groups of other sizes than this model's")
    by_id = {
        pid: p for g, own in zip(saved, groups, strict=True) for pid, p in zip(g["params"], own["params"], strict=True)
    }
    for pid, entry in state["state"].items():
        _check(path, pid in by_id and isinstance(entry, dict), f"state for an unknown parameter {pid!r}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                _check(
                    path,
                    value.shape == by_id[pid].shape,
                    f"{key} of parameter {pid} is {list(value.shape)}, the parameter {list(by_id[pid].shape)}",
                )
            else:
                _check(path, isinstance(value, (int, float, torch.Tensor)), f"{key} of parameter {pid} is not a number")


_NUMBER = (int, float)


def check_trainer_state(path: Path, state: Any) -> None:
    """The counters and data cursor a resume restores (engine/state.py TrainState, BlockSampler)."""
    _check(path, isinstance(state, dict), "not a JSON object")
    for key in ("step", "epoch", "position"):
        value = state.get(key)
        _check(path, type(value) is int and value >= 0, f"{key} is {value!r}, not a whole number >= 0")
    for key in ("tokens",):
        value = state.get(key, 0)
        _check(path, type(value) is int and value >= 0, f"{key} is {value!r}, not a whole number >= 0")
    elapsed = state.get("elapsed_s", 0.0)
    _check(path, isinstance(elapsed, _NUMBER) and not isinstance(elapsed, bool), f"elapsed_s is {elapsed!r}")
    for key in ("loss", "eval_loss", "best_eval_loss"):
        value = state.get(key)
        _check(
            path, value is None or (isinstance(value, _NUMBER) and not isinstance(value, bool)), f"{key} is {value!r}"
        )


def check_scheduler_state(path: Path, state: Any) -> None:
    """scheduler.pt as StepSchedule writes it (or an old {"step", "lr"}): plain numbers only, since torch's
    LambdaLR.load_state_dict copies every key onto the scheduler object."""
    _check(path, isinstance(state, dict), "not a scheduler state")
    if not state:
        return  # no scheduler.pt: rebuilt from the step
    step = state.get("last_epoch", state.get("step"))
    _check(path, type(step) is int and step >= 0, f"step is {step!r}, not a whole number >= 0")
    allowed = {
        "last_epoch",
        "step",
        "lr",
        "base_lrs",
        "_last_lr",
        "_step_count",
        "verbose",
        "lr_lambdas",
        "_get_lr_called_within_step",
        "_is_initial",
    }
    unknown = set(state) - allowed
    _check(path, not unknown, f"unexpected keys {_few(map(str, unknown))}")
    for key, value in state.items():
        items = value if isinstance(value, list) else [value]
        # lr_lambdas: None per group, or a callable's __dict__ ({} from the HF Trainer's schedules)
        plain = all(v is None or isinstance(v, (int, float)) or v == {} for v in items)
        _check(path, plain, f"{key} is not a number or a list of numbers")


def check_rng_state(path: Path, state: Any) -> None:
    """Every RNG state restores: tried on the real generators, then the current states put back, so a
    garbage rng.pt is refused here rather than after the run was marked running."""
    states = state if isinstance(state, list) else [state]
    _check(path, bool(states) and all(isinstance(s, dict) for s in states), "not an RNG state")
    saved = rng_state()
    try:
        for one in states:
            restore_rng(one)
    except Exception as exc:
        raise CheckpointInvalid(
            f"{path}: not an RNG state ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    finally:
        restore_rng(saved)

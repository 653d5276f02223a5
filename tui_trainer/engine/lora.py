"""LoRA with peft (the [lora] section): wrap a pretrained model so only its adapters train, and keep a
checkpoint's adapter in PEFT's own format beside a reference to the base it adapts.

A LoRA checkpoint holds adapter_config.json + adapter_model.safetensors (so
`PeftModel.from_pretrained(base, checkpoint_dir)` loads it), the optimizer state of the adapters alone, and
in tui_trainer_state.json `lora_base`: the base dir's path and the checksum of each of its weight files.
Resuming checks the base against it: adapters trained on other weights are refused, never silently mixed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import CheckpointInvalid, ConfigError, UserError
from tui_trainer.core.store import hash_file, own_state_path
from tui_trainer.engine import models

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_KEY = "lora_base"  # tui_trainer_state.json's reference to the base model
# a base dir's files whose bytes are the model: its config and every weight file (shards included)
BASE_SUFFIXES = (".safetensors", ".bin")


def is_adapter_checkpoint(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def wrap(model: Any, config: Config) -> Any:
    """The model with LoRA adapters on the family's (or lora.target_modules') modules, seeded by
    train.seed; every base parameter is frozen."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    targets = lora.targets or models.family_of(model).lora_targets(str(model.config.model_type))
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.train.seed)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; the user can do nothing
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = get_peft_model(model, peft_config)
    except ValueError as exc:  # a target that names no module of this model
        raise ConfigError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None
    if config.train.grad_checkpointing:  # frozen embeddings: recomputed blocks still need a grad to flow
        wrapped.enable_input_require_grads()
    # the adapter records where its base is, so PeftModel / AutoModel find it from the checkpoint alone
    wrapped.peft_config["default"].base_model_name_or_path = str(base_dir(config.model.pretrained))
    return wrapped


def weights_state(model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: the adapter in PEFT's names, or every weight."""
    if is_lora(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def adapter_config(model: Any) -> Any:
    """The peft config a checkpoint writes as adapter_config.json (None: not a LoRA model)."""
    return model.peft_config["default"] if is_lora(model) else None


def load_adapter(path: Path, model: Any, device: torch.device) -> None:
    """The checkpoint's adapter into the LoRA model, every tensor accounted for both ways."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, read_adapter(path, model, device))


def read_adapter(path: Path, model: Any, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter weights in PEFT's names, refused (CheckpointInvalid naming the file) unless
    they are exactly the LoRA model's: the same names, the same (full) shapes."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    source = path / ADAPTER_WEIGHTS
    try:
        weights = load_file(str(source), device=str(device))
    except Exception as exc:
        raise CheckpointInvalid(f"{source}: cannot read the adapter ({str(exc).splitlines()[0]})") from None
    own = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    if own != theirs:
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        wrong = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
        problem = "; ".join(
            f"{label} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointInvalid(f"{source}: does not fit the adapter ({problem})")
    return weights


def parameter_names(model: Any) -> dict[str, str]:
    """PEFT's name of each adapter weight (as adapter_model.safetensors holds it) -> the LoRA model's own
    parameter name (with the adapter's name in it), by PEFT's own renaming: `get_peft_model_state_dict`
    picks and renames the keys of the dict it is given and passes the values through, so the values here
    are the model's names."""
    from peft import get_peft_model_state_dict

    own = {name: name for name, param in model.named_parameters() if param.requires_grad}
    return dict(get_peft_model_state_dict(model, state_dict=own))


# ---------------------------------------------------------------- the base reference


def base_dir(base: str) -> Path:
    """model.pretrained as a local dir: itself, or a hub name's snapshot in the local cache."""
    root = Path(base).expanduser().absolute()
    if root.is_dir():
        return root
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:
        raise UserError(f"model.pretrained: {base!r} is not a local dir nor a cached model") from None


def base_reference(base: str) -> dict[str, Any]:
    """The base dir's path and the checksum of its config and each weight file."""
    root = base_dir(base)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in BASE_SUFFIXES or p.name == "config.json"))
    return {"path": str(root), "files": {p.name: hash_file(p) for p in files}}


def check_base(checkpoint: Path, base: str) -> dict[str, Any]:
    """The base dir must be the one the checkpoint's adapter was trained on; returns its reference."""
    try:
        recorded = json.loads(own_state_path(checkpoint).read_text(encoding="utf-8")).get(BASE_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        raise CheckpointInvalid(f"{own_state_path(checkpoint)}: names no base model for its adapter")
    try:
        now = base_reference(base)
    except UserError:
        raise UserError(f"model.pretrained: {base} is gone; the adapter in {checkpoint} needs its base") from None
    root = Path(now["path"])
    changed = sorted(
        name
        for name in set(recorded["files"]) | set(now["files"])
        if recorded["files"].get(name) != now["files"].get(name)
    )
    if changed:
        raise UserError(
            f"model.pretrained: {root / changed[0]} differs from the base {checkpoint.parent.parent.name}@"
            f"{int(checkpoint.name.split('-')[-1])} was trained on (checksum changed); restore the original "
            "base, or start a new adapter in a new run"
        )
    return now


# ---------------------------------------------------------------- inference and export


def base_of(checkpoint: Path) -> Path:
    """The base dir an adapter checkpoint names (adapter_config.json's base_model_name_or_path)."""
    try:
        config = json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return Path(config["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointInvalid(f"{checkpoint / ADAPTER_CONFIG}: names no base model ({exc})") from None


def load_merged(checkpoint: Path, dtype: torch.dtype | None = None) -> Any:
    """The base with the checkpoint's adapter merged into its weights: a plain transformers model (what
    export writes by default and generate samples from). The base is checked against the reference first."""
    from peft import PeftModel

    root = base_of(checkpoint)
    check_base(checkpoint, str(root))
    base = models.load_pretrained(str(root), 0.0)  # fp32: the merge adds the adapter at full precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    return merged

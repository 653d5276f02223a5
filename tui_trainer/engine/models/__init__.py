"""Model families: the one seam between the engine and the kinds of causal LM it trains (torchtitan's
TrainSpec registry). A family is one file in this package (auto.py is the generic one every other file
subclasses) plus one line in REGISTERED; the rest of the engine asks these functions, never a model class.

- a new model (random init): `new_model(config, vocab_size, eos_id)`, its family from model.arch;
- a pretrained dir (model.pretrained): `check_pretrained` reads its config.json only (before any data is
  prepared), `load_pretrained` loads it with its own class, refusing weights that do not fit the config;
- a checkpoint of ours: `from_checkpoint` builds the model its config.json describes (weights load later);
- any model: `family_of(model)` answers the rest (context length, blocks, decay split, LoRA targets).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.engine.models import auto, gpt2, llama
from tui_trainer.engine.models.auto import AutoFamily

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# Adding a family: a file beside this one with `FAMILY = YourFamily()`, and one line here.
REGISTERED: tuple[AutoFamily, ...] = (
    gpt2.FAMILY,
    llama.FAMILY,
)
FAMILIES: dict[str, AutoFamily] = {f.model_type: f for f in REGISTERED if f.model_type}
GENERIC = auto.FAMILY
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def family_for(model_type: str) -> AutoFamily:
    """The family serving a config.json's model_type (the generic one unless a file registers it)."""
    return FAMILIES.get(model_type, GENERIC)


def family_of(model: Any) -> AutoFamily:
    """The family of a built model (a peft-wrapped one included: its config is the base model's)."""
    return family_for(str(getattr(model.config, "model_type", "")))


def context_length(model: Any) -> int | None:
    """The most positions the model attends over (None: it states no limit)."""
    return family_of(model).context_length(model.config)


# ---------------------------------------------------------------- a new model


def new_model(config: Config, vocab_size: int, eos_id: int | None) -> PreTrainedModel:
    """A randomly initialised model of model.arch, seeded by train.seed (the same weights every time)."""
    m = config.model
    family = family_for(m.arch)
    try:
        hf_config = family.new_config(m.arch, m, vocab_size, eos_id)
    except ValueError as exc:  # AutoConfig knows no such model_type
        if "Unrecognized model" in str(exc) or "model_type" in str(exc):
            raise ConfigError(
                f"model.arch: transformers knows no model_type {m.arch!r} (e.g. {', '.join(sorted(FAMILIES))}, "
                "qwen2, gpt_neox)"
            ) from None
        raise ConfigError(f"model.arch: cannot configure a {m.arch} model: {_first_line(exc)}") from None
    _check_causal(hf_config, f"model.arch={m.arch}")
    torch.manual_seed(config.train.seed)
    try:
        return family.build(hf_config)
    except Exception as exc:
        raise ConfigError(f"model.arch: cannot build a {m.arch} model from these keys: {_first_line(exc)}") from None


# ---------------------------------------------------------------- a pretrained dir


def check_pretrained(path: str, block_size: int) -> PretrainedConfig:
    """model.pretrained, judged from its config.json alone (cheap: before data is prepared): a causal LM
    whose context holds model.block_size. One line naming the file and the reason otherwise."""
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model.pretrained: {local} is a file, not a model dir")
        config_file = local / "config.json"
        if not config_file.is_file():
            raise UserError(f"model.pretrained: {config_file} is missing: not a Hugging Face model dir")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"model.pretrained: {config_file} is unreadable: {_first_line(exc)}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise UserError(f"model.pretrained: {config_file} names no model_type: not a transformers config")
        if not any((local / name).is_file() for name in WEIGHT_FILES):
            raise UserError(f"model.pretrained: {local} holds no weights (no {' / '.join(WEIGHT_FILES[::2])})")
    try:
        hf_config = AutoConfig.from_pretrained(str(local) if local.exists() else path)
    except Exception as exc:
        where = f"{local / 'config.json'}" if local.exists() else repr(path)
        raise UserError(
            f"model.pretrained: cannot load {where} (only local dirs and cached models load offline): "
            f"{_first_line(exc)}"
        ) from None
    where = str(local / "config.json") if local.exists() else path
    _check_causal(hf_config, f"model.pretrained: {where}")
    limit = family_for(hf_config.model_type).context_length(hf_config)
    if limit is not None and block_size > limit:
        raise ConfigError(f"model.block_size: {block_size} is more than the model's {limit} positions ({where})")
    return hf_config


def load_pretrained(path: str, dropout: float) -> PreTrainedModel:
    """The pretrained model with its own class, in fp32; refused when its weights do not fit its config
    (transformers would otherwise initialise the missing tensors at random and train that, silently)."""
    hf_config = check_pretrained(path, 1)
    family = family_for(hf_config.model_type)
    local = Path(path).expanduser()
    weights = next((local / n for n in WEIGHT_FILES if (local / n).is_file()), local) if local.exists() else path
    try:
        model, info = family.load(str(local) if local.exists() else path, dropout)
    except Exception as exc:
        raise UserError(f"model.pretrained: {weights}: cannot load: {_first_line(exc)}") from None
    missing = _untied_missing(model, set(info.get("missing_keys") or ()))
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {len(keys)} (e.g. {sorted(keys)[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise UserError(
            f"model.pretrained: {weights} does not fit its config.json ({type(model).__name__}): "
            f"tensors {', '.join(parts)}"
        )
    return model


# ---------------------------------------------------------------- a checkpoint of ours


def from_checkpoint(checkpoint_dir: str | Path, dropout: float) -> PreTrainedModel:
    """The model a checkpoint's config.json describes, weights not initialised (they load next)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(checkpoint_dir)
    family = family_for(hf_config.model_type)
    for key, value in family.dropout_values(hf_config, dropout).items():
        setattr(hf_config, key, value)
    return family.build(hf_config)


def skeleton(model_dir: str | Path, dropout: float) -> PreTrainedModel:
    """The model a dir's config.json describes (a checkpoint of ours or model.pretrained) with its parameters
    on the meta device (no memory) and its buffers real: an FSDP rank that gets its weights from elsewhere
    (rank 0's broadcast, or the checkpoint's shards) builds this, shards it, then materialises its shard."""
    local = Path(model_dir).expanduser()
    with parameters_on_meta():  # a name that is no local dir: a cached hub model, as load_pretrained reads it
        return from_checkpoint(local if local.exists() else model_dir, dropout)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers inside this block goes to the meta device; buffers stay real.

    accelerate's `init_empty_weights(include_buffers=False)`, which this copies (accelerate is not a
    dependency of training): `with torch.device("meta")` would put buffers on meta too, and a buffer that is
    computed, not saved (Llama's rotary inv_freq), could then never be filled. A parameter is allocated
    (never touched, so never resident) and moved at once; one already on meta is kept as it is, so a weight
    tied to it stays the same object."""
    register = torch.nn.Module.register_parameter

    def to_meta(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(self, name, param)
        param = self._parameters[name]
        if param is not None and param.device.type != "meta":
            meta = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # transformers marks parameters (_is_hf_initialized)
            self._parameters[name] = meta

    torch.nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_model(model_dir: Path) -> torch.nn.Module:
    """The model a dir's config.json describes, on the meta device (no memory): its tensors' names and shapes."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return family_for(hf_config.model_type).build(hf_config)


def load_saved(path: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A model dir we wrote (a checkpoint, an export) for inference: its own class, safetensors only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)


def _check_causal(hf_config: Any, where: str) -> None:
    """A causal LM by transformers' own table of them: the config's architectures (the class its weights
    were saved from) when it names them, else its model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    classes = set(CAUSAL.values())
    named = [a for a in (getattr(hf_config, "architectures", None) or []) if isinstance(a, str)]
    if named and not any(a in classes for a in named):
        raise UserError(
            f"{where}: {named[0]} is not a causal language model (an encoder or another task's head); "
            "give a ...ForCausalLM model dir"
        )
    if not named and hf_config.model_type not in CAUSAL:
        raise UserError(f"{where}: model_type {hf_config.model_type!r} has no causal-LM class in transformers")


def _untied_missing(model: Any, missing: set[str]) -> set[str]:
    """The missing names that matter: one that shares storage with a name that did load (an output head
    tied to the embedding, which a checkpoint stores once) is not missing."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor), []).append(name)
    loaded_with = {name for names in groups.values() if set(names) - missing for name in names}
    return missing - loaded_with


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

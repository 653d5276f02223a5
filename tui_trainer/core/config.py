"""Run configuration: one dataclass per concern, loaded from TOML and `--set section.key=value`.

torch-free on purpose: the UI and the store read configs without importing the engine.
Every validation failure raises ConfigError naming the offending key.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_trainer.core.config_checks import finite, in_range, positive
from tui_trainer.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def key(default: Any, doc: str) -> Any:
    """A config key: its default and its one-line meaning. The meaning is the single source of what
    `tui-trainer config` prints above the key and of the README's configuration table."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The architecture of a new model (random init), or a pretrained model to start from."""

    arch: str = key(
        "gpt2",
        "Family of a new model: gpt2, llama, or any causal-LM model_type transformers knows (qwen2, gpt_neox, ...);"
        " ignored with model.pretrained (the dir's config.json decides).",
    )
    n_layer: int = key(4, "Transformer blocks.")
    n_head: int = key(4, "Attention heads per block; must divide n_embd.")
    n_embd: int = key(128, "Width of the residual stream.")
    n_kv_head: int = key(0, "Key/value heads (grouped-query attention) where the family has them; 0 = n_head.")
    block_size: int = key(
        128, "Context length in tokens (a new model's positions; with model.pretrained at most the model's)."
    )
    vocab_size: int = key(
        4096, "Most tokens the corpus BPE may learn; the model's vocab is what it learned, padded to a multiple of 64."
    )
    dropout: float = key(0.1, "Dropout on embeddings, attention and residual paths.")
    pretrained: str = key(
        "",
        "Local model dir or hub name to start from (loaded in fp32, whatever dtype it was saved in); empty = "
        "random init from the keys above.",
    )

    def validate(self) -> None:
        positive("model", self, "n_layer", "n_head", "n_embd", "block_size", "vocab_size")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_head: {self.n_head} does not divide model.n_embd={self.n_embd}")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_kv_head: must be 0 or divide model.n_head={self.n_head}, got {self.n_kv_head}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.arch):
            raise ConfigError(f"model.arch: expected a model_type such as gpt2 or llama, got {self.arch!r}")
        in_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass
class LoraConfig:
    """LoRA adapters on a pretrained model (peft): only the adapters train and are saved."""

    r: int = key(0, "Rank of the LoRA adapters; 0 = off (full fine-tuning). Needs model.pretrained.")
    alpha: int = key(16, "LoRA scaling numerator: the adapters' update is scaled by alpha / r.")
    dropout: float = key(0.05, "Dropout on the adapters' input (a branch may change it).")
    target_modules: str = key(
        "", "Comma-separated module names to adapt (e.g. q_proj,v_proj); empty = the family's default."
    )

    @property
    def targets(self) -> list[str]:
        """target_modules as a list; empty = the family's default."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def validate(self) -> None:
        if self.r < 0:
            raise ConfigError(f"lora.r: must be >= 0 (0 = off), got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        in_range("lora.dropout", self.dropout, 0.0, 1.0, high_open=True)
        bad = [t for t in self.targets if not re.fullmatch(r"[A-Za-z0-9_.]+", t)]
        if bad:
            raise ConfigError(f"lora.target_modules: {bad[0]!r} is not a module name (e.g. q_proj,v_proj)")


@dataclass
class DataConfig:
    """Where the training text comes from."""

    path: str = key("sample_data", "A .txt/.jsonl/.parquet file, a glob, a directory of them, or a hub dataset name.")
    text_column: str = key(
        "text", "Column holding the text in .jsonl/.parquet/hub datasets (plain .txt always uses lines)."
    )
    val_fraction: float = key(0.05, "Share of the rows held out (from the end) for evaluation; 0 disables eval.")
    num_proc: int = key(1, "Processes used by datasets.map for tokenization.")
    encoding: str = key("utf-8", "Text encoding of .txt/.jsonl files (any Python codec name, e.g. latin-1).")

    def validate(self) -> None:
        if not self.path.strip():
            raise ConfigError("data.path: is empty; give a file, glob, directory or dataset name")
        in_range("data.val_fraction", self.val_fraction, 0.0, 0.5, high_open=True)
        positive("data", self, "num_proc")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding: unknown encoding {self.encoding!r} (e.g. utf-8, latin-1)") from None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr over train.max_steps."""

    lr: float = key(1e-3, "Peak learning rate, reached after warmup_steps (in (0, 1]).")
    weight_decay: float = key(0.1, "AdamW weight decay, applied to matrices only (not biases, norms).")
    betas: tuple[float, float] = key((0.9, 0.95), "AdamW betas.")
    warmup_steps: int = key(
        50,
        "Linear warmup length in optimizer steps (below train.max_steps); when not set, min(50, train.max_steps"
        " // 10).",
    )
    min_lr: float = key(1e-4, "Floor of the cosine decay.")
    grad_clip: float = key(1.0, "Clip the global gradient norm to this; 0 disables clipping.")

    def validate(self) -> None:
        finite("optim.lr", self.lr)
        positive("optim", self, "lr")
        if self.lr > MAX_LR:
            raise ConfigError(f"optim.lr: AdamW learning rates above {MAX_LR:g} diverge; got {self.lr:g}")
        finite("optim.min_lr", self.min_lr)
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: must be in [0, optim.lr={self.lr:g}], got {self.min_lr:g}")
        # decoupled decay shrinks weights by lr * weight_decay per step: above 1 it erases what was learned
        in_range("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        in_range("optim.grad_clip", self.grad_clip, 0.0, MAX_GRAD_CLIP)


PRECISIONS = ("fp32", "bf16", "fp16")
MAX_LR = 1.0
MAX_GRAD_CLIP = 1e6
MAX_EVERY_MINUTES = 7 * 24 * 60.0
DEVICES = ("auto", "cpu", "cuda", "mps")
PARALLELS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """The loop: batch, schedule length, precision, device and logging cadence."""

    batch_size: int = key(16, "Sequences per micro-batch.")
    grad_accum: int = key(1, "Micro-batches per optimizer step (effective batch = batch_size * grad_accum).")
    max_steps: int = key(2000, "Optimizer steps in the schedule; the run finishes here.")
    seed: int = key(1337, "Seeds model init, dropout and the data order.")
    precision: str = key(
        "fp32",
        "`fp32`, `bf16` or `fp16`: the compute's dtype (autocast; fp16 adds a GradScaler). The weights and the "
        "optimizer state are fp32 whatever this says.",
    )
    grad_checkpointing: bool = key(False, "Recompute activations in backward to save memory.")
    eval_every: int = key(100, "Evaluate on the held-out split every N steps; 0 disables.")
    eval_batches: int = key(8, "Validation batches per evaluation.")
    log_every: int = key(1, "Log train loss every N steps (each log is a host sync on GPU).")
    device: str = key("auto", "`auto`, `cpu`, `cuda` or `mps`.")
    compile: bool = key(False, "Wrap the model in torch.compile (checkpoints always hold the plain model).")
    sample_every: int = key(
        -1,
        "Generate a sample from the live model every N steps into samples.jsonl; -1 = at each eval"
        " (every train.eval_every steps), 0 disables. Sampling never changes the losses.",
    )
    sample_prompt: str = key("", "Text each live sample continues; empty starts from the end-of-text token.")
    sample_tokens: int = key(64, "New tokens per live sample (capped by model.block_size).")
    parallel: str = key(
        "ddp",
        "Several ranks: `ddp` (a full copy of weights, grads and AdamW state per rank) or `fsdp` (FSDP2: all"
        " three sharded over the ranks; sharded checkpoints that resume on any number of ranks).",
    )

    @property
    def sample_interval(self) -> int:
        """Steps between live samples, the -1 sentinel resolved; 0 = off."""
        return self.eval_every if self.sample_every == -1 else self.sample_every

    def validate(self) -> None:
        positive("train", self, "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every")
        positive("train", self, "sample_tokens")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every: must be >= 0, got {self.eval_every}")
        if self.sample_every < -1:
            raise ConfigError(f"train.sample_every: must be >= 0, or -1 for each eval, got {self.sample_every}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"train.device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.parallel not in PARALLELS:
            raise ConfigError(f"train.parallel: must be one of {', '.join(PARALLELS)}, got {self.parallel!r}")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = key(200, "Save every N optimizer steps; 0 disables step-based saves.")
    every_minutes: float = key(10.0, "Also save when this many minutes passed since the last save; 0 disables.")
    keep_last: int = key(
        3, "Keep this many newest checkpoints per run (newest, best, pinned and branch parents always stay)."
    )
    async_save: bool = key(
        True,
        "Copy state to CPU at the step boundary and write it on a background thread"
        " (`checkpoint.async` is accepted too).",
    )
    hf_weights: bool = key(
        False, "fsdp: also stream an HF-loadable model.safetensors into each sharded checkpoint (full ones have one)."
    )

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps: must be >= 0, got {self.every_steps}")
        # a week between time-based saves is already "never"; 0 is how to turn them off
        in_range("checkpoint.every_minutes", self.every_minutes, 0.0, MAX_EVERY_MINUTES)
        positive("checkpoint", self, "keep_last")


@dataclass
class Config:
    """A whole run's configuration; saved into run.json and every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # (section, key) of every key a TOML file, --set or a recorded config gave; the rest are defaults
    given: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)

    @property
    def warmup_derived(self) -> bool:
        """optim.warmup_steps was not given: it follows train.max_steps (derived_warmup)."""
        return ("optim", "warmup_steps") not in self.given

    def validate(self) -> Config:
        for section in SECTIONS:
            getattr(self, section).validate()
        # A default must never make a valid choice fail: a warmup nobody set follows max_steps
        # (`--set train.max_steps=12` trains). One that was given is refused rather than clamped: a warmup
        # that never ends means the schedule never reaches its peak lr nor decays, never what a user meant.
        if self.warmup_derived:
            self.optim.warmup_steps = derived_warmup(self.train.max_steps)
        if self.optim.warmup_steps >= self.train.max_steps:
            raise ConfigError(
                f"optim.warmup_steps: {self.optim.warmup_steps} is not below train.max_steps="
                f"{self.train.max_steps}; the learning rate would never leave warmup (lower optim.warmup_steps)"
            )
        if self.lora.r and not self.model.pretrained:
            raise ConfigError("lora.r: LoRA adapts a pretrained model; set model.pretrained to its dir (or lora.r=0)")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, name)).items()
            }
            for name in SECTIONS
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", validate: bool = True) -> Config:
        """Build from a TOML/JSON table. `validate=False` reads a recorded config that today's rules may
        refuse (an older run's), so overrides can fix it before `validate()` runs."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of sections")
        config = cls()
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown config section (known: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a table of keys, got {values!r}")
            for key, value in values.items():
                _assign(config, section, key, value)
        return config.validate() if validate else config

    def with_overrides(self, assignments: list[str]) -> Config:
        """Apply `section.key=value` strings to a copy; values parse as TOML, else as plain strings."""
        config = copy.deepcopy(self)
        for item in assignments:
            dotted, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"{item}: expected section.key=value")
            section, _, key = dotted.strip().partition(".")
            _assign(config, section, key, _parse_value(raw.strip()))
        return config.validate()


def derived_warmup(max_steps: int) -> int:
    """optim.warmup_steps when not set: 50 steps, or a tenth of a shorter schedule (always below it)."""
    return min(DEFAULT_WARMUP, max_steps // 10)


DEFAULT_WARMUP = 50

SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "lora": LoraConfig,
}
SECTIONS = tuple(SECTION_TYPES)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then the `--set` overrides; validated."""
    config = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {p}") from None
        except OSError as exc:  # a directory, no permission: still bad input, not a crash
            raise ConfigError(f"--config: cannot read {p}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: {p} is not valid TOML: {exc}") from None
        config = Config.from_dict(data, source=str(p))
    return config.with_overrides(overrides or [])


# Names that cannot be Python fields, accepted in TOML and --set as written in the docs.
ALIASES = {("checkpoint", "async"): "async_save"}


def _assign(config: Config, section: str, key: str, value: Any) -> None:
    key = ALIASES.get((section, key), key)
    if section not in SECTIONS:
        raise ConfigError(f"{section}.{key}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(target))
        raise ConfigError(f"{section}.{key}: unknown key (known in [{section}]: {known})")
    setattr(target, key, _coerce(f"{section}.{key}", hints[key], value))
    config.given.add((section, key))


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            finite(name, float(value))
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(name, a, v) for a, v in zip(args, value, strict=False))
    elif origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional keys yet
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw

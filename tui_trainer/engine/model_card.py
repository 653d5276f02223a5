"""The README.md an export writes: what the model is, where it came from (lineage, losses), how to load it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tui_trainer.core.config_text import to_toml
from tui_trainer.core.errors import CheckpointInvalid, UserError
from tui_trainer.core.metrics_cache import history_columns
from tui_trainer.core.store import CheckpointInfo, RunStore, own_state_path
from tui_trainer.engine import lora


def model_card(store: RunStore, ckpt: CheckpointInfo, dtype: str, *, adapter: bool = False) -> str:
    state = _trainer_state(ckpt.path)
    config = state.get("config") or _run_config(store, ckpt.run)
    family = _model_type(ckpt.path)
    base = (config.get("model") or {}).get("pretrained") if isinstance(config, dict) else None
    lora_cfg = (config.get("lora") or {}) if isinstance(config, dict) else {}
    what = f"A {family} causal language model"
    if lora_cfg.get("r"):
        targets = lora_cfg.get("target_modules") or "the family's default modules"
        lora_line = f"LoRA adapter: r={lora_cfg['r']}, alpha={lora_cfg.get('alpha')}, on {targets}"
        what = (
            f"A LoRA adapter (peft) for a {family} model"
            if adapter
            else f"A {family} model with a LoRA adapter merged in"
        )
    else:
        lora_line = ""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{family}, tui-trainer]",
        *([f"base_model: {base}"] if base else []),
        "---",
        "",
        f"# {ckpt.run} at step {ckpt.step}",
        "",
        f"{what} trained with tui-trainer, exported from checkpoint `{ckpt.ref}` with {dtype} weights.",
        "",
        *([f"Fine-tuned from `{base}`.", ""] if base else []),
        *([lora_line + ".", ""] if lora_line else []),
        "## Lineage",
        "",
        *_lineage_lines(store, ckpt),
        "",
        "## Losses at this checkpoint",
        "",
        "| train loss | eval loss (measured at) | best eval loss so far | tokens seen |",
        "| --- | --- | --- | --- |",
        f"| {_num(ckpt.loss)} | {_eval_cell(store, ckpt)} | {_num(state.get('best_eval_loss'))} | "
        f"{_int(state.get('tokens'))} |",
        "",
        "## Training config",
        "",
        "As `tui-trainer config` prints it (`--config` reads it back).",
        "",
        "```toml",
        to_toml(config).rstrip(),
        "```",
        "",
        "## Use",
        "",
        *(_adapter_use(base) if adapter else _model_use()),
    ]
    return "\n".join(lines)


def _model_use() -> list[str]:
    return [
        "```python",
        "from transformers import pipeline",
        "",
        'generate = pipeline("text-generation", model="path/to/this/dir")',
        'print(generate("Hello", max_new_tokens=40)[0]["generated_text"])',
        "```",
        "",
    ]


def _adapter_use(base: str | None) -> list[str]:
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "path/to/the/base"}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/dir")',
        "```",
        "",
    ]


def _lineage_lines(store: RunStore, ckpt: CheckpointInfo) -> list[str]:
    try:
        chain = store.lineage(ckpt.run)
    except UserError:
        chain = [(ckpt.run, None)]
    lines = []
    for run, branched_at in chain:
        if branched_at is None:
            lines.append(f"- `{run}` up to step {ckpt.step} (this checkpoint)")
        else:
            lines.append(f"- `{run}` up to step {branched_at}, where the next run branched off")
    if len(chain) == 1:
        lines.append("- (trained from scratch, no parent run)")
    return lines


def _eval_cell(store: RunStore, ckpt: CheckpointInfo) -> str:
    """The checkpoint's eval loss and the step it was measured at (the latest eval at or before it)."""
    if not isinstance(ckpt.eval_loss, (int, float)):
        return "n/a"
    try:
        segments = history_columns(store, ckpt.run)
    except UserError:
        return _num(ckpt.eval_loss)
    steps = np.concatenate([cols["step"][~np.isnan(cols["eval_loss"])] for _, cols in segments])
    steps = steps[steps <= ckpt.step]
    return f"{_num(ckpt.eval_loss)} (step {int(steps[-1])})" if len(steps) else _num(ckpt.eval_loss)


def _model_type(path: Path) -> str:
    """The family the checkpoint's config.json names (gpt2, llama, ...; a LoRA checkpoint's base's)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, CheckpointInvalid):
        config = path / "config.json" if not lora.is_adapter_checkpoint(path) else lora.base_of(path) / "config.json"
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type") or "causal-lm")
    return "causal-lm"


def _trainer_state(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(own_state_path(path).read_text(encoding="utf-8"))
        if isinstance(state, dict):
            return state
    return {}


def _run_config(store: RunStore, run: str) -> dict[str, Any]:
    with contextlib.suppress(UserError):
        config = store.read_record(run).get("config")
        if isinstance(config, dict):
            return config
    return {}


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"

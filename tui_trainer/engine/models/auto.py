"""The generic family: any causal LM transformers can build or load with AutoModelForCausalLM.

Every other family subclasses `AutoFamily` and overrides only what its model does differently (gpt2.py,
llama.py). What a family answers is everything the rest of the engine needs to know about a model, so no
module outside engine/models names a model class (ARCHITECTURE.md: how to add a model family).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# The names transformers' configs use for the context length, most specific first.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx")
# Every name a config may give one of its dropout probabilities; model.dropout sets those a config has.
DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "activation_dropout",
)


class AutoFamily:
    """A model family: how to build, load and describe one kind of causal LM (torchtitan's TrainSpec)."""

    # the config.json model_type this family serves; None = the generic family, which serves the rest
    model_type: str | None = None

    # ---------------------------------------------------------------- building

    def new_config(self, arch: str, m: ModelConfig, vocab_size: int, eos_id: int | None) -> PretrainedConfig:
        """The config of a new model of `arch` from our keys, in the names every config understands
        (hidden_size, num_hidden_layers, ...: transformers maps them onto each family's own)."""
        from transformers import AutoConfig

        config = AutoConfig.for_model(arch)
        values: dict[str, Any] = {
            "vocab_size": vocab_size,
            "hidden_size": m.n_embd,
            "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "tie_word_embeddings": True,  # as GPT-2: the embedding is the output head (fewer parameters)
        }
        if hasattr(config, "num_key_value_heads"):
            values["num_key_value_heads"] = m.n_kv_head or m.n_head
        if hasattr(config, "intermediate_size"):
            values["intermediate_size"] = self.mlp_width(m.n_embd)
        if hasattr(config, "head_dim"):
            values["head_dim"] = m.n_embd // m.n_head
        context = next((k for k in CONTEXT_KEYS if hasattr(config, k)), "max_position_embeddings")
        values[context] = m.block_size
        values.update(self.dropout_values(config, m.dropout))
        return AutoConfig.for_model(arch, **values)

    def mlp_width(self, n_embd: int) -> int:
        """The MLP's inner width for a new model: GPT-2's 4x."""
        return 4 * n_embd

    def build(self, config: PretrainedConfig) -> PreTrainedModel:
        """A model with fresh weights from the global torch RNG (seeded by the caller), in fp32."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def load(self, path: str | Path, dropout: float) -> tuple[PreTrainedModel, dict[str, Any]]:
        """A pretrained model with its own class, in fp32 (the optimizer's master weights), and
        transformers' loading report (missing / unexpected / mismatched keys)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        for key, value in self.dropout_values(config, dropout).items():
            setattr(config, key, value)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, output_loading_info=True, use_safetensors=None
        )
        return loaded

    def dropout_values(self, config: PretrainedConfig, p: float) -> dict[str, float]:
        """model.dropout for every dropout probability this config has."""
        return {key: p for key in DROPOUT_KEYS if isinstance(getattr(config, key, None), (int, float))}

    # ---------------------------------------------------------------- what the engine asks

    def context_length(self, config: PretrainedConfig) -> int | None:
        """The most positions the model can attend over (None: no fixed limit it states)."""
        for key in CONTEXT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def block_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The repeated transformer blocks: the unit of gradient checkpointing and of FSDP wrapping. Found
        by transformers' own `_no_split_modules` (the classes it never splits across devices)."""
        names = set(getattr(model, "_no_split_modules", None) or ())
        return [module for module in model.modules() if type(module).__name__ in names]

    def decay_split(self, model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(decayed, not decayed) trainable parameters, each in named_parameters order: matrices decay,
        biases and norm weights do not (nanoGPT's split; transformers.Trainer's too for these models, in
        the same order, so optimizer.pt moves between the two)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]

    def lora_targets(self, model_type: str) -> list[str] | None:
        """The modules LoRA adapts by default; None = peft's own default for this model_type."""
        return None

    def describe(self, config: PretrainedConfig) -> str:
        """The family as the user reads it (model card, details)."""
        return str(getattr(config, "model_type", "") or "causal LM")


FAMILY = AutoFamily()

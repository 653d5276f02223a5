"""GPT-2: the family a new model is by default (model.arch = "gpt2"), built exactly as nanoGPT's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import ModelConfig
from tui_trainer.engine.models.auto import AutoFamily

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class GPT2Family(AutoFamily):
    model_type = "gpt2"

    def new_config(self, arch: str, m: ModelConfig, vocab_size: int, eos_id: int | None) -> PretrainedConfig:
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=m.block_size,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
        )

    def build(self, config: Any) -> PreTrainedModel:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(config)

    def load(self, path: str | Path, dropout: float) -> tuple[PreTrainedModel, dict[str, Any]]:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config.from_pretrained(path)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
        loaded: Any = GPT2LMHeadModel.from_pretrained(
            path, config=config, dtype=torch.float32, output_loading_info=True
        )
        return loaded

    def lora_targets(self, model_type: str) -> list[str] | None:
        # the fused q/k/v projection (peft's default) and the attention output
        return ["c_attn", "c_proj"]


FAMILY = GPT2Family()

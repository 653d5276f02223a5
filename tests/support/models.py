"""Tiny pretrained model dirs of several families, made the way a user's own would be: a random-init
model of that family saved by transformers plus a tokenizer trained here (no hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "gpt_neox")


def make_model_dir(path: Path, model_type: str, tokenizer: Any, *, seed: int = 0) -> Path:
    """`AutoModelForCausalLM.from_config(...).save_pretrained(path)` and the tokenizer beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer) + 20,  # a vocabulary of its own (not a multiple of 64): kept as it is
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention where the family has it (ignored elsewhere)
        max_position_embeddings=64,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

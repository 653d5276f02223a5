"""The model a run trains (a new one, a pretrained one, or a checkpoint's) and its optimizer. Which kind of
model it is stays engine/models' business: this module names no model class."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import ConfigError
from tui_trainer.engine import lora, models
from tui_trainer.engine.tokenizer import padded_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def build_model(
    config: Config, tokenizer: PreTrainedTokenizerBase, start: Path | None = None, *, skeleton: bool = False
) -> PreTrainedModel:
    """A checkpoint's model (`start`: built from its config.json, weights loaded later), the pretrained
    model (model.pretrained: its own class and vocabulary), or a new one of model.arch seeded by train.seed
    whose vocabulary follows the tokenizer, padded (model.vocab_size is only what the BPE was asked to learn).
    `skeleton`: the same model with its parameters on the meta device, nothing read or initialised (an FSDP
    rank whose weights come from rank 0 or from the checkpoint's shards: engine/fsdp.py `build_sharded`); a
    LoRA adapter checkpoint's base is still loaded whole."""
    m = config.model
    if start is not None and lora.is_adapter_checkpoint(start):  # its base was checked before data prep
        model: Any = models.load_pretrained(m.pretrained, m.dropout)
    elif start is not None:
        model = models.skeleton(start, m.dropout) if skeleton else models.from_checkpoint(start, m.dropout)
    elif m.pretrained:
        model = (
            models.skeleton(m.pretrained, m.dropout) if skeleton else models.load_pretrained(m.pretrained, m.dropout)
        )
    else:
        with models.parameters_on_meta() if skeleton else contextlib.nullcontext():
            model = models.new_model(config, padded_vocab(len(tokenizer)), tokenizer.eos_token_id)
    limit = models.context_length(model)
    if limit is not None and m.block_size > limit:
        raise ConfigError(f"model.block_size: {m.block_size} is more than the model's {limit} positions")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size} embeddings (tokenizer and model do not match)"
        )
    if config.train.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def make_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the family's decay split (engine/models: matrices decay, biases and norms do not, the
    same split and order as transformers.Trainer.create_optimizer's, so optimizer.pt loads into an HF
    Trainer's optimizer and back); fused kernels on CUDA."""
    decay, no_decay = models.family_of(model).decay_split(model)
    o = config.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=device.type == "cuda" or None)


def apply_optim_config(optimizer: torch.optim.Optimizer, config: Config) -> None:
    """After loading optimizer state, the *config* decides hyperparameters (a branch may change them)."""
    decay_group, no_decay_group = optimizer.param_groups
    decay_group["weight_decay"] = config.optim.weight_decay
    no_decay_group["weight_decay"] = 0.0
    for group in optimizer.param_groups:
        group["betas"] = tuple(config.optim.betas)

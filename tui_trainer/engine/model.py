"""Build the GPT-2 model from config or load it from a local dir / hub name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.engine.tokenizer import padded_vocab

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase


def checkpoint_vocab(checkpoint_dir: Path | None) -> int | None:
    """The vocabulary a checkpoint's model was built with (its config.json), so resuming rebuilds that shape."""
    if checkpoint_dir is None:
        return None
    return int(json.loads((checkpoint_dir / "config.json").read_text())["vocab_size"])


def build_model(config: Config, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> GPT2LMHeadModel:
    """Random init from config (seeded), or `from_pretrained` when model.pretrained is set (its vocabulary
    is kept). A new model's vocabulary follows the tokenizer, padded (model.vocab_size is only what the BPE
    was asked to learn); `vocab_size` overrides that with a checkpoint's own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = config.model
    dropout: dict[str, Any] = {"resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout}
    torch.manual_seed(config.train.seed)
    if m.pretrained:
        try:
            model = GPT2LMHeadModel.from_pretrained(m.pretrained, **dropout)
        except Exception as exc:
            raise UserError(
                f"model.pretrained: cannot load {m.pretrained!r} (only local dirs and cached models load "
                f"offline): {str(exc).splitlines()[0]}"
            ) from None
        if m.block_size > model.config.n_positions:
            raise ConfigError(
                f"model.block_size: {m.block_size} is more than the model's {model.config.n_positions} positions"
            )
    else:
        eos = tokenizer.eos_token_id
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size or padded_vocab(len(tokenizer)),
                n_positions=m.block_size,
                n_embd=m.n_embd,
                n_layer=m.n_layer,
                n_head=m.n_head,
                bos_token_id=eos,
                eos_token_id=eos,
                **dropout,
            )
        )
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
    """AdamW with decay on matrices only (nanoGPT's split); fused kernels on CUDA. For GPT-2 this is also
    transformers.Trainer.create_optimizer's split and order (decay, then biases and LayerNorm weights, each
    in named_parameters order), so optimizer.pt loads into an HF Trainer's optimizer and back."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
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

"""Sample text from a checkpoint dir (a plain Hugging Face model dir)."""

from __future__ import annotations

from pathlib import Path

import torch

from tui_trainer.core.errors import CheckpointInvalid, UserError
from tui_trainer.core.hf_runs import is_hf_checkpoint
from tui_trainer.core.store import verify_checkpoint
from tui_trainer.engine import lora, sharded_checkpoint
from tui_trainer.engine.checkpoint_load import check_config_fits_weights


def generate_text(
    checkpoint_dir: Path, prompt: str = "", max_new_tokens: int = 80, seed: int = 0, temperature: float = 0.8
) -> str:
    """Prompt + continuation. Verifies the checkpoint first; loads weights from safetensors only."""
    import transformers
    from transformers import AutoTokenizer

    from tui_trainer.engine.models import context_length, load_saved

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens: must be > 0, got {max_new_tokens}")
    try:
        if not is_hf_checkpoint(Path(checkpoint_dir)):  # an HF Trainer's checkpoint has no manifest to check
            verify_checkpoint(Path(checkpoint_dir))
        adapter = lora.is_adapter_checkpoint(Path(checkpoint_dir))
        sharded = sharded_checkpoint.is_sharded_checkpoint(Path(checkpoint_dir))
        if sharded:
            sharded_checkpoint.check_config_fits_weights(Path(checkpoint_dir))
        elif not adapter:
            check_config_fits_weights(Path(checkpoint_dir))
    except CheckpointInvalid as exc:
        raise CheckpointInvalid(f"cannot generate: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    # a LoRA checkpoint: its base (checked against the reference) with the adapter merged in
    if sharded:  # FSDP's shards (engine/sharded_checkpoint.py), whole in this process
        model = sharded_checkpoint.load_model(Path(checkpoint_dir)).eval()
    else:
        model = (lora.load_merged(Path(checkpoint_dir)) if adapter else load_saved(checkpoint_dir)).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else None
    if ids is None or ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    limit = (context_length(model) or ids.shape[1] + max_new_tokens) - ids.shape[1]
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max(1, min(max_new_tokens, limit)),
                do_sample=True,
                temperature=temperature,
                top_k=50,
                pad_token_id=tokenizer.eos_token_id,
            )
    finally:
        torch.set_rng_state(generator_state)
    return str(tokenizer.decode(out[0], skip_special_tokens=True))

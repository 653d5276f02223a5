"""Llama (and the families built on its layout: a new model with model.arch = "llama")."""

from __future__ import annotations

from tui_trainer.engine.models.auto import AutoFamily

SWIGLU_MULTIPLE = 32  # the MLP width is rounded up to this, as Llama rounds its 8/3 * width


class LlamaFamily(AutoFamily):
    model_type = "llama"

    def mlp_width(self, n_embd: int) -> int:
        """SwiGLU's three matrices at 8/3 x the width cost what GPT-2's two at 4x do (Llama's choice)."""
        return -(-8 * n_embd // 3 // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE

    def lora_targets(self, model_type: str) -> list[str] | None:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]


FAMILY = LlamaFamily()

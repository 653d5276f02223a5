"""Live samples while training (train.sample_every) and the gradient norm the loop logs.

Sampling must not change training: it draws from its own torch.Generator (seeded from train.seed and the
step), runs in eval mode (no dropout) under no_grad, and never touches the global RNG states (torch, CUDA,
python, numpy). So a run with samples on logs bit-identical losses to the same run with them off, and a
sample at a step is the same text before and after a resume.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from tui_trainer.engine import fsdp

TOP_K = 50
TEMPERATURE = 0.8
UNBOUNDED_CONTEXT = 1 << 16  # a model that states no context length (rare): prompt tail kept, tokens capped
SEED_STRIDE = 1_000_003  # a prime: (seed, step) pairs map to distinct generator seeds in practice


@dataclass(frozen=True)
class Sample:
    step: int
    prompt: str
    text: str
    seconds: float


def due(step: int, interval: int) -> bool:
    """A sample is due at `step` every `interval` steps (TrainConfig.sample_interval; 0 = off)."""
    return interval > 0 and step % interval == 0


def grad_norm(parameters: Iterable[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The pre-clip global L2 norm of the gradients, as a device tensor (no host sync). Clips to `clip` when
    it is > 0 (what clip_grad_norm_ does anyway); with clipping off it only measures, leaving grads as is."""
    params = list(parameters)
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return fsdp.full_value(norm)  # FSDP: the norm of sharded grads, reduced over the ranks


def generator_for(device: torch.device, seed: int, step: int) -> torch.Generator:
    """A private generator for the sample at `step`: the same text for the same weights, every time."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * SEED_STRIDE + step) % 2**63)
    return generator


def sample(
    model: Any,
    tokenizer: Any,
    *,
    step: int,
    prompt: str,
    tokens: int,
    seed: int,
    autocast: AbstractContextManager[Any] | None = None,
) -> Sample:
    """Generate up to `tokens` new tokens after `prompt` from the live model, then put it back in the mode it
    was in. Raises FloatingPointError when the model's outputs are not finite (a diverged model)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            ids = _prompt_ids(model, tokenizer, prompt)
            new = _continue(model, ids, tokens, generator_for(ids.device, seed, step), step)
    finally:
        model.train(was_training)
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    return Sample(step, prompt, text, time.perf_counter() - start)


def _prompt_ids(model: Any, tokenizer: Any, prompt: str) -> torch.Tensor:
    """The prompt's token ids on the model's device (end-of-text when empty), its tail kept when it would
    leave no room in the context."""
    ids = tokenizer(prompt)["input_ids"] if prompt else []
    if not ids:
        ids = [tokenizer.eos_token_id]
    room = _context(model) - 1
    device = next(model.parameters()).device
    return torch.tensor([ids[-room:]], dtype=torch.long, device=device)


def _continue(model: Any, ids: torch.Tensor, tokens: int, generator: torch.Generator, step: int) -> list[int]:
    """Top-k sampling with the KV cache. Gumbel-max over the top-k logits instead of torch.multinomial: it
    takes the generator the same way and cannot trip a device-side assert on odd probabilities."""
    limit = min(tokens, _context(model) - ids.shape[1])
    name = _cache_argument(model)
    past, x, out = None, ids, []
    for i in range(limit):
        result = model(input_ids=x, use_cache=True, **{name: past})
        past = getattr(result, name)
        logits = result.logits[:, -1, :].float() / TEMPERATURE
        if i == 0 and not bool(torch.isfinite(logits).all()):  # a diverged model: a NAN fault, not garbage
            raise FloatingPointError(f"the model's outputs are not finite at step {step}")
        values, indices = torch.topk(logits, min(TOP_K, logits.shape[-1]))
        uniform = torch.rand(values.shape, generator=generator, device=values.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        x = indices.gather(-1, (values + gumbel).argmax(-1, keepdim=True))
        out.append(x)
    return torch.cat(out, dim=1)[0].tolist() if out else []


def _context(model: Any) -> int:
    """The positions the model attends over; one with no stated limit is held to a generous one."""
    from tui_trainer.engine.models import context_length

    return context_length(model) or UNBOUNDED_CONTEXT


def _cache_argument(model: Any) -> str:
    """The KV cache's name in forward() and its output: `cache` in transformers 5.x, `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper passes it on
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"

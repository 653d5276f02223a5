"""Short human formats shared by the app and the CLI: one vocabulary for losses, sizes, durations and
checkpoint marks (kept narrow: the app must fit in 80 columns). Free of torch and textual."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tui_trainer.core.events import Failed
    from tui_trainer.core.store import CheckpointInfo, RunInfo

__all__ = [
    "MARK_BEST",
    "MARK_INVALID",
    "MARK_MEANINGS",
    "MARK_NEWEST",
    "MARK_PINNED",
    "age",
    "duration",
    "folder",
    "last_good",
    "loss",
    "lr",
    "marks",
    "perplexity",
    "plural",
    "rate",
    "remedy",
    "size",
]

MARK_NEWEST = "★"
MARK_BEST = "◆"
MARK_PINNED = "⚑"
MARK_INVALID = "✗"
# what each mark means, in the words the help screen and README use (RunInfo.best defines best)
MARK_MEANINGS = (
    (MARK_NEWEST, "newest checkpoint of its run"),
    (MARK_BEST, "best: lowest eval loss measured at that checkpoint (none before a run's first eval)"),
    (MARK_PINNED, "pinned: kept by retention"),
    (MARK_INVALID, "invalid: failed verification, cannot be resumed"),
)


def marks(run: RunInfo, ckpt: CheckpointInfo) -> str:
    """★ newest, ◆ best, ⚑ pinned; an invalid checkpoint is only ✗."""
    if not ckpt.valid:
        return MARK_INVALID
    out = ""
    if run.newest is not None and run.newest.step == ckpt.step:
        out += MARK_NEWEST
    if run.best is not None and run.best.step == ckpt.step:
        out += MARK_BEST
    if ckpt.pinned:
        out += MARK_PINNED
    return out


def folder(path: Path) -> str:
    """A directory as the user would type it: ./runs/ for a relative path."""
    text = str(path).rstrip("/")
    return f"{text}/" if path.is_absolute() or text.startswith(".") else f"./{text}/"


def plural(n: int, word: str, many: str | None = None) -> str:
    """1 run, 2 runs, 0 checkpoints."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def loss(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def perplexity(eval_loss: float | None) -> str:
    """exp(eval loss), the number papers quote: "ppl 6.42" ("–" when unknown, "inf" past float range)."""
    if eval_loss is None or not math.isfinite(eval_loss):
        return "–"
    if eval_loss > 700:  # exp overflows a float past ~709
        return "inf"
    value = math.exp(eval_loss)
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 2h13m, 3d04h."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def age(seconds: float) -> str:
    """Coarse age for the tree: now, 45s, 5m, 3h, 2d."""
    if seconds < 5:
        return "now"
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def rate(value: float | None, unit: str = "tok/s") -> str:
    if value is None or not math.isfinite(value):
        return f"– {unit}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.1f}{suffix} {unit}"
    return f"{value:.0f} {unit}"


def size(n: float | None) -> str:
    """Compact bytes: 812B, 1.2K, 34M, 1.5G."""
    if n is None:
        return "–"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            if unit == "B":
                return f"{n:.0f}B"
            return f"{n:.1f}{unit}" if n < 100 else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"  # pragma: no cover


def preparing(stage: str, done: int, total: int | None) -> str:
    """'preparing data: tokenizing 42%' (a count when the total is unknown), as the app's status line says."""
    if total:
        return f"preparing data: {stage} {min(100, 100 * done // total)}%"
    return f"preparing data: {stage}…" if not done else f"preparing data: {stage} {done:,}"


def lr(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


def remedy(failed: Failed, *, resume: str, branch: str) -> str:
    """The fault's description followed by what to do about it; `resume` and `branch` say how this front end
    does that (the CLI names a command, the app a key). An ERROR fault has no remedy: its message alone."""
    from tui_trainer.core.events import FaultKind

    advice = {
        FaultKind.NAN: f"branch from it with a lower optim.lr ({branch})",
        FaultKind.DISK: f"free space or fix permissions, then {resume}",
        FaultKind.OOM: "lower train.batch_size and raise train.grad_accum, use train.precision=bf16, or set "
        f"train.grad_checkpointing=true; then resume the last checkpoint ({last_good(failed)}): {resume}",
    }.get(failed.kind)
    return f"{failed.message}: {advice}" if advice else failed.message


def last_good(failed: Failed) -> str:
    """The fault's last good checkpoint in words: "step 4" in its own run, the parent's for a branch."""
    if failed.last_good is None:
        return "none yet"
    run, _, step = failed.last_good.rpartition("@")
    return f"step {step}" if run == failed.run else f"{failed.last_good}, where this branch started"


def model_line(config: dict[str, Any]) -> str:
    """What a run trains, in one line, for a run that is not the default new GPT-2: the family, the base
    model it starts from and the LoRA rank ("llama · from SmolLM2-135M · LoRA r=16"); "" for the default."""
    model: dict[str, Any] = config.get("model") or {}
    lora: dict[str, Any] = config.get("lora") or {}
    if not isinstance(model, dict) or not isinstance(lora, dict):
        return ""
    base = str(model.get("pretrained") or "")
    arch = str(model.get("arch") or "gpt2")
    parts = [] if base else [arch] if arch != "gpt2" else []
    if base:
        parts.append(f"from {base.rstrip('/').rsplit('/', 1)[-1]}")
    if isinstance(lora.get("r"), int) and lora["r"] > 0:
        parts.append(f"LoRA r={lora['r']}")
    return " · ".join(parts)

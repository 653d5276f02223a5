"""Shared helpers for the benchmark scripts: the benchmark config, the bare reference loop, subprocess
workers, a tmux pane (tests/support/tmux.py), tables and machine info. Plain python; no pytest.

Every script runs its measurements in fresh subprocesses (``python benchmarks/X.py --worker ...``) so that
each side starts from the same state (no warm allocator, no leftover threads), and interleaves repeats
(A B C D A B C D ...) because the machine is shared and noisy; tables report medians.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/tui-trainer-bench"))
PY = sys.executable
TUI = str(Path(PY).with_name("tui-trainer"))
RESULT_PREFIX = "BENCH-RESULT "

# The one workload every side runs: the app's defaults (4x128 GPT-2, block 128, batch 16, fp32, AdamW
# lr 1e-3 wd 0.1 betas (0.9, 0.95), clip 1.0, dropout 0.1, tinyshakespeare with a 4096 BPE), with eval
# and checkpoints off so that only the training step is timed, and a long schedule so no run finishes.
BENCH_SET = [
    "train.eval_every=0",
    "checkpoint.every_steps=0",
    "checkpoint.every_minutes=0",
    "train.max_steps=100000",
]


# --quick (smoke tests, BENCH_QUICK=1 in the environment, inherited by every worker and CLI): a much
# smaller model so a script finishes in under a minute even on a loaded machine. Numbers from it mean little.
QUICK_SET = ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "train.batch_size=4", "model.vocab_size=512"]


def quick() -> bool:
    return os.environ.get("BENCH_QUICK") == "1"


def set_quick(on: bool) -> None:
    if on:
        os.environ["BENCH_QUICK"] = "1"


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads for every side (OMP_NUM_THREADS is inherited by workers, the CLI and
    the app). On a shared, oversubscribed machine 1 thread per process gives far steadier numbers."""
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ["MKL_NUM_THREADS"] = str(n)


def common_args(ap: Any) -> None:
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, few steps, one repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every side (default: torch's)")


def apply_common(args: Any) -> None:
    set_quick(args.quick)
    set_threads(args.threads)


def threads_note() -> str:
    n = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={n} on every side" if n else f"torch default threads ({os.cpu_count()} cores)"


def overrides(extra: Sequence[str] = ()) -> list[str]:
    return [*BENCH_SET, *(QUICK_SET if quick() else []), *extra]


def bench_config(extra: Sequence[str] = ()) -> Any:
    from tui_trainer.core.config import Config

    return Config().with_overrides(overrides(extra)).validate()


def set_args(extra: Sequence[str] = ()) -> list[str]:
    out: list[str] = []
    for kv in overrides(extra):
        out += ["--set", kv]
    return out


def fresh_dir(name: str) -> Path:
    path = WORK / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- subprocess workers


def emit(result: dict[str, Any]) -> None:
    """A worker's answer: one marked JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker(script: str, args: Sequence[str], timeout: float = 600, env: dict[str, str] | None = None) -> dict:
    """Run `python benchmarks/<script> --worker ARGS...` and return its emitted JSON."""
    cmd = [PY, str(BENCH_DIR / script), "--worker", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"worker {' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def interleave(sides: dict[str, Callable[[], Any]], repeats: int, log: Callable[[str], None] = print) -> dict:
    """Run every side once per repeat, `repeats` times; returns {side: [results]}.

    Each repeat starts one side later (A B C, B C A, C A B, …): on a shared VM a side's position in the
    round biased it by several percent (the last side ran slowest in every fixed-order run), and with
    `repeats` a multiple of the number of sides every side takes every position equally often."""
    out: dict[str, list[Any]] = {name: [] for name in sides}
    order = list(sides.items())
    for r in range(repeats):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            out[name].append(fn())
            log(f"  [{r + 1}/{repeats}] {name}: done in {time.perf_counter() - t0:.1f}s")
    return out


# ---------------------------------------------------------------- metrics.jsonl


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def steady_tokens_per_s(metrics: list[dict[str, Any]], warmup: int, tokens_per_step: int) -> dict[str, float]:
    """Throughput over steps (warmup, last]: wall time between the two log lines, so it counts everything
    the loop does between steps (logging, events, the UI's share of the CPU)."""
    steps = [r for r in metrics if "loss" in r and "step" in r]
    window = [r for r in steps if r["step"] >= warmup]
    if len(window) < 2:
        raise RuntimeError(f"not enough logged steps after warmup {warmup}: {len(window)}")
    first, last = window[0], window[-1]
    n = last["step"] - first["step"]
    span = last["time"] - first["time"]
    step_times = [r["step_time"] for r in window[1:]]
    return {
        "tokens_per_s": n * tokens_per_step / span,
        "steps": n,
        "median_step_s": statistics.median(step_times),
    }


# ---------------------------------------------------------------- tmux


def pane(command: Sequence[str], width: int = 120, height: int = 40, cwd: Path = ROOT) -> Any:
    """`command` started in a real pseudo-terminal: the tests' tmux Pane (tests/support/tmux.py), so the
    benchmarks drive the app exactly as the end-to-end test does. No output recording (it would add a
    `cat` process beside the app being measured); truecolor as in a modern terminal."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from support.tmux import Pane

    p = Pane(cwd, width, height, term="xterm-256color", record=False)
    p.start(command, env={"COLORTERM": "truecolor"})
    return p


# ---------------------------------------------------------------- tables


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return ""
    return f"{min(xs):,.4g}–{max(xs):,.4g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": "none (CPU only)" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
    }


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_section(name: str, text: str) -> None:
    """Save one script's markdown output where run_all.py picks it up."""
    out = WORK / "sections"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)


def publish(name: str, text: str) -> None:
    """Print a script's section (its tables and notes) and save it for BENCHMARKS.md."""
    print(text)
    write_section(name, text)


def write_metrics(path: Path, first: int, last: int, *, eval_every: int = 0, seed: int | None = None) -> None:
    """Append synthetic metrics.jsonl lines for steps first..last: a power-law loss with seeded noise
    (seed: `first` unless given), and an eval line every `eval_every` steps (0: none)."""
    import random

    noise = random.Random(first if seed is None else seed)
    with open(path, "a") as fh:
        for s in range(first, last + 1):
            record = {
                "step": s,
                "loss": 8.0 * s**-0.15 + noise.random() * 0.05,
                "lr": 1e-3,
                "tokens": s * 2048,
                "tokens_per_s": 30000.0,
                "step_time": 0.07,
                "time": 1.7e9 + s * 0.07,
            }
            fh.write(json.dumps(record) + "\n")
            if eval_every and s % eval_every == 0:
                fh.write(json.dumps({"step": s, "eval_loss": record["loss"] + 0.1, "time": record["time"]}) + "\n")

"""Live samples: what one sample (train.sample_tokens new tokens, engine/sampling.py) costs on the default
model, beside one training step of the benchmark workload, and what that adds at the default cadence (a
sample at each eval, every train.eval_every=100 steps). In-process; medians over interleaved repeats.
Run: python benchmarks/sample_cost.py [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

EVERY = 100  # the default cadence: train.sample_every=-1 follows train.eval_every=100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from tui_trainer.engine import sampling
    from tui_trainer.engine.data import prepare_data
    from tui_trainer.engine.model import build_model, make_optimizer

    config = C.bench_config()
    data = prepare_data(config, None)
    model = build_model(config, data.tokenizer).train()
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    batch = data.train[: config.train.batch_size]

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sample(tokens: int) -> None:
        sampling.sample(model, data.tokenizer, step=1, prompt="", tokens=tokens, seed=config.train.seed)

    sides = {"train step": step, "sample 64 tokens": lambda: sample(64), "sample 127 tokens": lambda: sample(127)}
    repeats = 2 if C.quick() else (args.repeats or 7)
    step()  # warm up (allocator, first-call overheads) before anything is timed
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    step_s = C.median(times["train step"])
    rows = []
    for name, xs in times.items():
        med = C.median(xs)
        rows.append([name, med * 1000, C.spread([x * 1000 for x in xs]), med / step_s])
    # x train step is also the % a sample adds at one per EVERY steps (the default cadence)
    headers = ["call", "ms (median)", "range", "x train step"]
    info = C.machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {C.threads_note()}, load {C.load_avg()}")
    print(C.table(headers, rows))


if __name__ == "__main__":
    main()

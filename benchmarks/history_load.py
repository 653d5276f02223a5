"""History cache: how long selecting a run with a 10^6-step metrics.jsonl takes until its curve exists.

Measures the app's own loader (`tui.history.load_curves`, which the app runs on a worker thread) on a run
with N train lines plus an eval line every 100 steps:
- before: the record path the app used until the cache (RunStore.history -> read_metrics -> Curves from dicts)
- cold: no cache yet (parse every line, then write runs/<run>/.metrics-cache/)
- cached: the cache covers the whole file
- cached + 1,000 new lines: the cache, then only the appended bytes are parsed (and appended to the cache)
- parse only: no cache written (as where the run dir is read-only)
Run: python benchmarks/history_load.py [--steps N] [--repeats N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], None] = lambda: None) -> list[float]:
    out = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    from tui_trainer.core import metrics_cache
    from tui_trainer.core.metrics_cache import CACHE_DIR
    from tui_trainer.core.store import RunStore
    from tui_trainer.tui.history import load_curves
    from tui_trainer.tui.series import Curves

    root = C.fresh_dir("history-load")
    store = RunStore(root)
    store.create_run("long", {}, None)
    path = store.metrics_path("long")
    C.write_metrics(path, 1, args.steps, eval_every=100)
    cache = store.run_dir("long") / CACHE_DIR
    size_mb = path.stat().st_size / 1e6
    print(f"history load: {args.steps:,} steps, {size_mb:.0f} MB metrics.jsonl (load {C.load_avg()})")

    def load() -> Curves:
        return load_curves(store, "long", 0.9)

    def old_path() -> Curves:
        curves = Curves.from_segments("long", store.history("long"))
        curves.set_smoothing(0.9)
        return curves

    def drop_cache() -> None:
        shutil.rmtree(cache, ignore_errors=True)

    rows = []
    reference = old_path()
    before = timed(old_path, args.repeats)
    rows.append(["before: read_metrics + Curves from records", before])
    rows.append(["cold: no cache (parse, then write the cache)", timed(load, args.repeats, drop_cache)])
    cached = timed(load, max(5, args.repeats))
    rows.append(["cached", cached])
    check = load()  # the same curve as before (the smoothed one up to rounding: it is vectorised now)
    assert (check.loss.y == reference.loss.y).all() and (check.eval.y == reference.eval.y).all()
    assert np.allclose(check.smooth.y, reference.smooth.y, rtol=1e-12, atol=0)

    step = [args.steps]

    def append_1000() -> None:
        C.write_metrics(path, step[0] + 1, step[0] + 1000, eval_every=100)
        step[0] += 1000

    rows.append(["cached + 1,000 appended lines", timed(load, args.repeats, append_1000)])
    drop_cache()
    metrics_cache.MIN_CACHE_BYTES = 1 << 62  # never worth caching: what a read-only run dir gets
    rows.append(["parse only (no cache written, as in a read-only dir)", timed(load, args.repeats)])
    text = (
        f"`load_curves` (what selecting a run costs until its curve exists) on a {args.steps:,}-step history "
        f"({size_mb:.0f} MB metrics.jsonl, an eval line every 100 steps), median of {args.repeats} "
        f"(cached: {max(5, args.repeats)}), load average {C.load_avg()}:\n\n"
        + C.table(
            ["path", "median (s)", "runs (s)"],
            [[name, statistics.median(ts), " ".join(f"{t:.3f}" for t in ts)] for name, ts in rows],
        )
        + "\n\nTarget < 0.5 s for a cached 10^6-step history: "
        + ("met" if statistics.median(cached) < 0.5 else "MISSED")
        + "."
    )
    C.publish("history_load", text)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

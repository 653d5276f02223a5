"""The app's throughput against another version of the app, and both against headless, interleaved.

    git worktree add /tmp/app-base <commit>        # the version to compare against
    python benchmarks/app_ab.py --base /tmp/app-base [--repeats 4] [--steps 100]

Each repeat runs three sides, the order rotating: the app of --base (its tree first on PYTHONPATH), the app of
this tree, and headless of this tree; each is throughput.py's `engine_app` / `engine_cli` in a fresh process
(tmux 120x40 for the app, OMP_NUM_THREADS=1, 10 warmup steps). Prints each run, then the medians and the
paired ratios (each repeat's app ÷ that repeat's headless): the VM's speed drifts by several percent from
minute to minute, so only sides measured side by side compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
WARMUP = 10


def side(tree: Path, fn: str, steps: int) -> float | None:
    code = (
        f"import sys; sys.path.insert(0, {str(tree / 'benchmarks')!r}); import throughput as T, json; "
        f"print('R', json.dumps(T.{fn}({WARMUP}, {steps})))"
    )
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("R ")]
    if not lines:
        print(f"{tree} {fn} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return float(json.loads(lines[0][2:])["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the app version to compare against")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per side")
    args = ap.parse_args()
    base = args.base.resolve()
    sides = [("app-base", base, "engine_app"), ("app", HERE, "engine_app"), ("headless", HERE, "engine_cli")]
    results: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    print(f"load before {os.getloadavg()} at {time.strftime('%H:%M:%S')}", flush=True)
    for rep in range(args.repeats):
        for name, tree, fn in sides[rep % 3 :] + sides[: rep % 3]:
            tps = side(tree, fn, args.steps)
            if tps is not None:
                results[name].append(tps)
                print(f"repeat {rep} {name:8s} {tps:,.0f} tokens/s", flush=True)
    print(f"load after {os.getloadavg()} at {time.strftime('%H:%M:%S')}")
    headless = statistics.median(results["headless"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:8s} {[round(v) for v in values]} median {median:,.0f}  ÷ headless {median / headless:.3f}")
    for name in ("app-base", "app"):
        paired = [a / h for a, h in zip(results[name], results["headless"], strict=False)]
        print(f"{name:8s} paired ÷ headless {[round(r, 3) for r in paired]} median {statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()

"""Distributed: what running under torchrun costs when there is nothing to parallelise.

A 1-rank DDP run (`torchrun --standalone --nproc-per-node 1 -m tui_trainer -- train --headless`) against
the same headless run without torchrun: same config, same data, steady tokens/s over the steps after a
warmup, from the runs' own metrics.jsonl. The difference is DDP's wrapper and gradient all_reduce over a
1-member gloo group, plus the StepVote all_reduce at every step boundary, which is also timed on its own
(microseconds per vote, 1 and 2 ranks). Sides are interleaved, each in fresh processes.
Run: python benchmarks/ddp_overhead.py [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

STEPS, WARMUP = 40, 10
VOTES = 2000


def train_command(runs: Path, torchrun: bool, steps: int) -> list[str]:
    args = ["train", "--name", "b", "--headless", "--runs-dir", str(runs), "--until-step", str(steps)]
    args += C.set_args(["checkpoint.every_steps=0", "checkpoint.every_minutes=0", "train.eval_every=0"])
    if not torchrun:
        return [C.PY, "-m", "tui_trainer", *args]
    return [
        C.PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "tui_trainer",
        "--",
        *args,
    ]


def run_side(torchrun: bool, steps: int, warmup: int) -> dict:
    runs = C.fresh_dir(f"ddp-{'torchrun' if torchrun else 'plain'}") / "runs"
    # torchrun sets OMP_NUM_THREADS=1 for its workers unless it is set: give both sides the same threads
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    subprocess.run(train_command(runs, torchrun, steps), check=True, capture_output=True, cwd=C.ROOT, env=env)
    cfg = C.bench_config()
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    metrics = C.read_jsonl(runs / "b" / "metrics.jsonl")
    result = C.steady_tokens_per_s(metrics, warmup, tokens_per_step)
    # What a step costs: the median step, and the fastest quarter's (other agents' bursts only ever add
    # time, so the quick steps are the ones least disturbed); the wall-clock rate carries every burst.
    times = sorted(r["step_time"] for r in metrics if "loss" in r and r["step"] > warmup)
    result["median_tokens_per_s"] = tokens_per_step / result["median_step_s"]
    result["p25_tokens_per_s"] = tokens_per_step / times[len(times) // 4]
    return result


def vote_worker() -> None:
    """Under torchrun: time VOTES StepVotes (after a few warm ones) and emit microseconds per vote."""
    from tui_trainer.engine import distributed
    from tui_trainer.engine.device import resolve_device
    from tui_trainer.engine.distributed import Flag, StepVote

    with distributed.joined() as d:
        d.place("cpu", resolve_device)
        vote = StepVote(d)
        for _ in range(50):
            vote(Flag(0))
        d.barrier()
        start = time.perf_counter()
        for _ in range(VOTES):
            vote(Flag(0))
        us = (time.perf_counter() - start) / VOTES * 1e6
        if d.is_main:
            C.emit({"us_per_vote": us, "world_size": d.world_size})


def vote_side(nproc: int) -> float:
    cmd = [C.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [str(C.BENCH_DIR / "ddp_overhead.py"), "--vote-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(C.RESULT_PREFIX):
            return float(C.json.loads(line[len(C.RESULT_PREFIX) :])["us_per_vote"])
    raise RuntimeError(f"vote worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(ap)
    ap.add_argument("--vote-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vote_worker:
        vote_worker()
        return
    C.apply_common(args)
    steps, warmup = (20, 5) if C.quick() else (STEPS, WARMUP)
    repeats = args.repeats or (1 if C.quick() else 4)
    load_before = C.load_avg()
    got = C.interleave(
        {"plain": lambda: run_side(False, steps, warmup), "torchrun": lambda: run_side(True, steps, warmup)}, repeats
    )
    votes = {n: [vote_side(n) for _ in range(max(1, repeats // 2))] for n in (1, 2)}
    rows = []
    for name, label in (("plain", "headless, no torchrun"), ("torchrun", "torchrun, 1 rank (DDP + StepVote)")):
        quick = [r["p25_tokens_per_s"] for r in got[name]]
        steady = [r["median_tokens_per_s"] for r in got[name]]
        wall = [r["tokens_per_s"] for r in got[name]]
        rows.append([label, C.median(quick), C.spread(quick), C.median(steady), C.spread(steady), C.median(wall)])
    costs = [1 - rows[1][i] / rows[0][i] for i in (1, 3, 5)]
    rows[0].append("—")
    rows[1].append(" / ".join(f"{100 * c:+.1f} %" for c in costs))
    step_s = C.median([r["median_step_s"] for r in got["torchrun"]])
    text = "\n".join(
        [
            f"Command: `{' '.join(['python benchmarks/ddp_overhead.py', *sys.argv[1:]])}`" + f" — {C.threads_note()}; "
            f"{repeats} interleaved repeats, {steps} steps, tokens/s over steps ({warmup}, {steps}]; load average "
            f"before {load_before}, after {C.load_avg()}.",
            "",
            C.table(
                [
                    "side",
                    "tokens/s, fastest quarter of steps",
                    "spread",
                    "tokens/s, median step",
                    "spread",
                    "tokens/s, wall clock",
                    "cost vs no torchrun (quarter / median / wall)",
                ],
                rows,
            ),
            "",
            C.table(
                ["StepVote (one all_reduce of 5 int32, gloo, CPU)", "µs per step (median)", "of a step"],
                [
                    [f"{n} rank{'s' if n > 1 else ''}", C.median(v), f"{100 * C.median(v) / 1e6 / step_s:.3f} %"]
                    for n, v in votes.items()
                ],
            ),
        ]
    )
    C.publish("ddp_overhead", text)


if __name__ == "__main__":
    main()

"""Real size: data preparation. Time from start to the first optimizer step on 1 / 10 / 30 / 100 MB corpora,
first run (empty caches: read, train the tokenizer, tokenize) and cached start (a second run on the same
corpus and cache), with each stage's time taken from the DataProgress events and tokenising speed in MB/s.

Corpora are the venv's own .py files (UTF-8 ones only) concatenated into a temp dir, so nothing is
downloaded. Each run is a fresh process with its own HF_DATASETS_CACHE (shared by the first and the cached
run of one size), in-process `plan_train` + `Trainer.run(until_step=1)` with the default model (4x128,
block 128, batch 16, vocab 4096), timed from `Trainer.run` (torch import excluded) to the first StepLogged.
`--profile MB` instead runs cProfile over a first run's data preparation and prints where the time goes.
Run: python benchmarks/data_prep.py [--quick] [--sizes 1,10,30,100] [--profile 10]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SITE = Path(sys.executable).resolve().parent.parent / "lib"
STAGES = ("reading", "training tokenizer", "tokenizing")


def build_corpus(mb: int) -> Path:
    """`mb` MB of the venv's Python sources, in a stable order (same bytes every time)."""
    path = C.WORK / "data_prep" / f"corpus-{mb}mb.txt"
    want = mb * 1_000_000
    if path.is_file() and path.stat().st_size >= want:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("wb") as out:
        for src in sorted(SITE.rglob("*.py")):
            data = src.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            out.write(data[: want - written])
            written += min(len(data), want - written)
            if written >= want:
                break
    if written < want:
        raise SystemExit(f"only {written / 1e6:.0f} MB of .py files under {SITE}")
    return path


def run_worker(corpus: Path, cache: Path, runs: Path, name: str) -> dict:
    """One run to its first step; seconds per stage (first report to done == total) and to the first step."""
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from tui_trainer.core.config import Config
    from tui_trainer.core.events import DataProgress, StepLogged
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    config = Config().with_overrides(C.overrides([f"data.path={str(corpus)!r}"]))
    store = RunStore(runs)
    start = time.perf_counter()
    began: dict[str, tuple[float, float]] = {}
    took: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (all threads): what the stage costs, whatever the load
    first_step: list[float] = []

    def sink(event: object) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        if isinstance(event, DataProgress):
            began.setdefault(event.stage, (now, now_cpu))
            if event.total is not None and event.done == event.total:
                took[event.stage] = now - began[event.stage][0]
                cpu[event.stage] = now_cpu - began[event.stage][1]
        elif isinstance(event, StepLogged) and not first_step:
            first_step.append(now - start)

    Trainer(store, plan_train(store, config, name), sink, until_step=1).run()
    return {"first_step_s": first_step[0], "stages": took, "cpu": cpu}


def profile_worker(corpus: Path, cache: Path) -> str:
    """cProfile of prepare_data on an empty cache: the top functions by own time and by cumulative time."""
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    from tui_trainer.core.config import Config
    from tui_trainer.engine.data import prepare_data

    config = Config().with_overrides(C.overrides([f"data.path={str(corpus)!r}"]))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(prepare_data, config, None)
    total = time.perf_counter() - start
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats(25)
    return f"prepare_data {total:.1f} s\n" + out.getvalue()


def measure(mb: int, older: str | None) -> list:
    """One table row: a first run on an empty cache, then a cached start, on `mb` MB."""
    corpus = build_corpus(mb)
    tag = f"{mb}_old" if older else str(mb)
    cache, runs = C.fresh_dir(f"data_prep_cache_{tag}"), C.fresh_dir(f"data_prep_runs_{tag}")
    env = {"PYTHONPATH": older} if older else None
    load = C.load_avg()
    args = ["run", str(corpus), str(cache), str(runs)]
    first = C.worker("data_prep.py", [*args, "first"], timeout=900, env=env)
    cached = C.worker("data_prep.py", [*args, "cached"], timeout=900, env=env)
    st, nan = first["stages"], float("nan")
    size_mb = corpus.stat().st_size / 1e6
    return [
        f"{mb} MB" + (" (older code)" if older else ""),
        first["first_step_s"],
        *(st.get(s, nan) for s in STAGES),
        size_mb / st["tokenizing"] if st.get("tokenizing") else nan,
        size_mb / first["cpu"]["tokenizing"] if first["cpu"].get("tokenizing") else nan,
        cached["first_step_s"],
        cached["stages"].get("tokenizing", nan),
        "n/a" if not cached["stages"] else "no" if "training tokenizer" in cached["stages"] else "yes",
        f"{load} / {C.load_avg()}",
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if sys.argv[2] == "profile":
            print(profile_worker(Path(sys.argv[3]), Path(sys.argv[4])))
            return C.emit({})
        return C.emit(run_worker(Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.common_args(ap)
    ap.add_argument("--sizes", default="1,10,30,100", help="corpus sizes in MB")
    ap.add_argument("--profile", type=int, default=None, metavar="MB", help="cProfile a first run on MB MB")
    ap.add_argument(
        "--compare-with",
        default=None,
        metavar="DIR",
        help="also time a tree holding an older tui_trainer/ (e.g. `git archive REV tui_trainer | tar -x -C DIR`)",
    )
    args = ap.parse_args()
    C.apply_common(args)
    if args.profile:
        corpus, cache = build_corpus(args.profile), C.fresh_dir("data_prep_profile")
        proc = subprocess.run(
            [C.PY, __file__, "--worker", "profile", str(corpus), str(cache)], capture_output=True, text=True
        )
        print(proc.stdout or proc.stderr)
        return
    sizes = [1] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    for mb in sizes:
        rows.append(measure(mb, None))
        print(C.table(HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
        if args.compare_with:
            rows.append(measure(mb, args.compare_with))
            print(C.table(HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
    text = (
        f"{C.machine_info()['cpu']}, {os.cpu_count()} cores, {C.threads_note()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n" + C.table(HEADERS, rows)
    )
    print("\n" + text)
    C.write_section("data_prep", text)


HEADERS = [
    "corpus",
    "first: to 1st step s",
    "reading s",
    "training tokenizer s",
    "tokenizing s",
    "tokenizing MB/s",
    "tokenizing MB per CPU-s",
    "cached: to 1st step s",
    "cached: tokenizing s",
    "tokenizer reused",
    "load avg before / after",
]

if __name__ == "__main__":
    main()

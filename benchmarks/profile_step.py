"""Where the time goes: cProfile of the engine's loop and of the bare loop over the same steps (in-process,
fresh subprocesses), top entries by own time, plus the per-step time the engine spends outside
forward/backward/optimizer. Used to explain a missed throughput target.
Run: python benchmarks/profile_step.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

TOP = 14


def profile(side: str, steps: int) -> dict:
    import throughput

    cfg = C.bench_config()
    prof = cProfile.Profile()
    if side == "bare":
        parts = throughput.build_reference(cfg)  # setup outside the profile, as for the engine
        prof.enable()
        throughput.bare_loop(cfg, 0, steps, parts=parts)
        prof.disable()
    else:
        from tui_trainer.core.plan import plan_train
        from tui_trainer.core.store import RunStore
        from tui_trainer.engine.trainer import Trainer

        store = RunStore(C.fresh_dir("prof"))
        trainer = Trainer(store, plan_train(store, cfg, "prof"), until_step=steps)
        trainer._setup()  # profile the loop only: setup runs before enable()
        trainer._setup = lambda: None  # type: ignore[method-assign]
        prof.enable()
        trainer.run()
        prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(TOP)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    # own time outside torch's compute, per step: everything in tui_trainer, json, io, psutil
    outside = 0.0
    for (file, _line, _fn), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if any(k in file for k in ("tui_trainer", "json", "psutil", "_pyio", "threading")):
            outside += tt
    return {
        "top": lines[start : start + TOP + 1],
        "total": st.total_tt,
        "outside_per_step_ms":  # type: ignore[attr-defined]
        outside / steps * 1000,
        "steps": steps,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return C.emit(profile(sys.argv[2], int(sys.argv[3])))
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    steps = 10 if args.quick else 60
    out = []
    for side in ("engine", "bare"):
        r = C.worker("profile_step.py", [side, str(steps)])
        out.append(
            f"**{side}** ({steps} steps, {r['total']:.2f} s profiled; own time in tui_trainer/json/io/"
            f"psutil/threading: {r['outside_per_step_ms']:.2f} ms per step)\n\n```\n" + "\n".join(r["top"]) + "\n```"
        )
    text = "\n\n".join(out)
    C.publish("profile", text)


if __name__ == "__main__":
    main()

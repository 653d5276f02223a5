"""6. Memory: peak RSS of a training process on CPU, fp32 vs bf16, gradient checkpointing off/on; the bare
loop beside it as the reference. Each cell is a fresh subprocess (`resource.getrusage(RUSAGE_SELF)
.ru_maxrss` at the end). GPU columns are filled only where torch sees a CUDA device.
Run: python benchmarks/memory.py [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def worker(side: str, precision: str, gc: bool, steps: int) -> dict:
    import torch

    extra = [f"train.precision={precision}", f"train.grad_checkpointing={str(gc).lower()}"]
    cfg = C.bench_config(extra)
    if side == "bare":
        import throughput

        throughput.bare_loop(cfg, 0, steps, precision)
    else:
        from tui_trainer.core.plan import plan_train
        from tui_trainer.core.store import RunStore
        from tui_trainer.engine.trainer import Trainer

        store = RunStore(C.fresh_dir(f"mem-{precision}-{gc}"))
        Trainer(store, plan_train(store, cfg, "mem"), until_step=steps).run()
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mb": gpu / 2**20 if gpu is not None else None,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        return C.emit(worker(a[0], a[1], a[2] == "1", int(a[3])))
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    repeats = args.repeats or 1
    steps = 2 if args.quick else 10
    cells = [(side, p, gc) for side in ("engine", "bare") for p in ("fp32", "bf16") for gc in (False, True)]
    sides = {
        f"{s}|{p}|{gc}": (lambda s=s, p=p, gc=gc: C.worker("memory.py", [s, p, "1" if gc else "0", str(steps)]))
        for s, p, gc in cells
    }
    print(f"memory: {len(cells)} cells x {repeats} (load {C.load_avg()})")
    res = C.interleave(sides, repeats)
    rows = []
    for key, rs in res.items():
        s, p, gc = key.split("|")
        rss = C.median([r["rss_mb"] for r in rs])
        gpu = rs[0]["gpu_peak_mb"]
        rows.append(
            [
                {"engine": "engine (Trainer)", "bare": "bare loop"}[s],
                p,
                "on" if gc == "True" else "off",
                f"{rss:,.0f}",
                f"{gpu:,.0f}" if gpu is not None else "n/a (no GPU on this machine)",
            ]
        )
    cfg = C.bench_config()
    text = C.table(["side", "precision", "grad checkpointing", "peak RSS (MB)", "peak GPU allocated (MB)"], rows)
    text += (
        f"\n\nModel {cfg.model.n_layer}x{cfg.model.n_embd}, batch {cfg.train.batch_size} x block "
        f"{cfg.model.block_size}, {steps} steps; RSS includes the Python interpreter, torch, transformers, "
        f"datasets and the tokenized corpus. bf16 is autocast (weights and AdamW state stay fp32). "
        f"The engine's figure also holds a tokenizer trained in-process and the DeviceMonitor (psutil)."
    )
    C.publish("memory", text)


if __name__ == "__main__":
    main()

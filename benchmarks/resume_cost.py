"""4. Resume cost as the run grows: time from starting a resume to the first optimizer step, for a
checkpoint at step 100, 10,000 and 1,000,000, beside transformers.Trainer's cost of skipping batches to
the same point.

The large checkpoints are synthetic: a real checkpoint (a short headless run) copied into a new run
whose trainer_state.json says step N (with a matching data cursor, token count and a schedule long enough
to continue), with the manifest re-hashed by `tui_trainer.core.store.write_manifest`. Each resume runs in a
fresh process, in-process through `plan_resume` + `Trainer.run`, timed to the first StepLogged event
(verify, load, data, model, seek; torch import excluded, identical for all N).

HF Trainer resumes by skipping `global_step % steps_per_epoch` batches of the current epoch with
`accelerate.skip_first_batches` on its prepared dataloader. We time that skip + the first batch on a
dataset long enough that step N lies in epoch 0 (any real pretraining corpus; on tinyshakespeare an
epoch is only ~150 batches, so HF would skip at most that many).
Run: python benchmarks/resume_cost.py [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

POINTS = (100, 10_000, 1_000_000)
MAX_STEPS = 2_000_000


def make_store() -> Path:
    """A real 2-step checkpoint, then one synthetic run per resume point."""
    from tui_trainer.core.store import MANIFEST, TRAINER_STATE, checkpoint_dirname, read_manifest, write_manifest

    runs = C.fresh_dir("resume")
    subprocess.run(
        [C.TUI, "train", "--headless", "--run", "base", "--runs-dir", str(runs), "--until-step", "2", *C.set_args()],
        check=True,
        capture_output=True,
        cwd=C.ROOT,
        timeout=600,
    )
    base = runs / "base"
    src = sorted((base / "checkpoints").glob("step-*"))[-1]
    for n in POINTS:
        name = f"at{n}"
        dst_run = runs / name
        shutil.copytree(base, dst_run, ignore=shutil.ignore_patterns(".lock", "checkpoints"))
        record = json.loads((dst_run / "run.json").read_text())
        record["name"] = name
        record["config"]["train"]["max_steps"] = MAX_STEPS
        record["status"] = "paused"
        (dst_run / "run.json").write_text(json.dumps(record, indent=2))
        ck = dst_run / "checkpoints" / checkpoint_dirname(n)
        shutil.copytree(src, ck)
        ts = json.loads((ck / TRAINER_STATE).read_text())
        batch = ts["config"]["train"]["batch_size"]
        ts.update(
            step=n,
            epoch=n * batch // 2000,
            tokens=n * batch * ts["config"]["model"]["block_size"],
            elapsed_s=ts["elapsed_s"] * n / 2,
            run=name,
        )
        ts["config"]["train"]["max_steps"] = MAX_STEPS
        (ck / TRAINER_STATE).write_text(json.dumps(ts, indent=2))
        meta = {k: v for k, v in read_manifest(ck).items() if k not in ("files", "format")}
        (ck / MANIFEST).unlink()
        write_manifest(ck, {**meta, "step": n, "run": name})
    return runs


def resume_worker(runs: Path, n: int) -> dict:
    import torch  # noqa: F401  (imported before the clock starts: the same for every N)

    from tui_trainer.core.events import StepLogged
    from tui_trainer.core.plan import plan_resume
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    store = RunStore(runs)
    first: list[float] = []

    def sink(event: object) -> None:
        if isinstance(event, StepLogged) and not first:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    plan = plan_resume(store, f"at{n}")
    trainer = Trainer(store, plan, sink, until_step=n + 1)
    trainer.run()
    assert trainer.step == n + 1 and plan.start_step == n, (trainer.step, plan.start_step)
    # put the run back as it was so the next repeat resumes the same checkpoint
    shutil.rmtree(store.checkpoint_dir(f"at{n}", n + 1), ignore_errors=True)
    return {"first_step_s": first[0] - t0}


def hf_skip_worker(n: int, measure_batches: int) -> dict:
    """Time skip_first_batches(dl, measure_batches) + first batch on HF Trainer's prepared dataloader."""
    import throughput
    import torch
    from accelerate import skip_first_batches
    from transformers import Trainer, TrainingArguments

    cfg = C.bench_config()
    blocks, model, opt = throughput.build_reference(cfg)
    B = cfg.train.batch_size
    length = (measure_batches + 2) * B

    class Long(torch.utils.data.Dataset):  # a corpus long enough that step n is in epoch 0
        def __len__(self) -> int:
            return length

        def __getitem__(self, i: int) -> dict:
            x = blocks[i % len(blocks)]
            return {"input_ids": x, "labels": x}

    args = TrainingArguments(
        output_dir=str(C.fresh_dir("hfskip")),
        per_device_train_batch_size=B,
        max_steps=10,
        report_to=[],
        use_cpu=True,
        dataloader_drop_last=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Long(), optimizers=(opt, None))
    dl = trainer.get_train_dataloader()  # what train() iterates: accelerate-prepared
    t0 = time.perf_counter()
    skipped = skip_first_batches(dl, measure_batches)
    next(iter(skipped))
    span = time.perf_counter() - t0
    return {
        "skip_s": span,
        "batches": measure_batches,
        "extrapolated": measure_batches != n,
        "skip_s_at_n": span * n / measure_batches if measure_batches != n else span,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind = sys.argv[2]
        if kind == "resume":
            return C.emit(resume_worker(Path(sys.argv[3]), int(sys.argv[4])))
        return C.emit(hf_skip_worker(int(sys.argv[3]), int(sys.argv[4])))
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    repeats = args.repeats or (1 if args.quick else 3)
    # HF's 1,000,000-batch skip is measured directly in the full run, extrapolated from 100,000 in --quick
    hf_cap = 100_000 if args.quick else 1_000_000
    print(f"resume cost: {repeats} interleaved repeats (load {C.load_avg()})")
    runs = make_store()
    sides = {}
    for n in POINTS:
        sides[f"ours@{n}"] = lambda n=n: C.worker("resume_cost.py", ["resume", str(runs), str(n)])
        sides[f"hf@{n}"] = lambda n=n: C.worker("resume_cost.py", ["hfskip", str(n), str(min(n, hf_cap))])
    res = C.interleave(sides, repeats)
    rows = []
    base = C.median([r["first_step_s"] for r in res[f"ours@{POINTS[0]}"]])
    for n in POINTS:
        ours = [r["first_step_s"] for r in res[f"ours@{n}"]]
        hf = res[f"hf@{n}"]
        hf_s = C.median([r["skip_s_at_n"] for r in hf])
        note = f" (extrapolated from {hf[0]['batches']:,} batches)" if hf[0]["extrapolated"] else ""
        rows.append([f"{n:,}", C.median(ours), C.spread(ours), f"{C.median(ours) / base:.2f}", f"{hf_s:,.3f}{note}"])
    text = C.table(
        [
            "resume at step",
            "ours: start → first step (s)",
            "range (s)",
            "× step-100 cost",
            "HF Trainer: skip_first_batches + first batch (s)",
        ],
        rows,
    )
    text += (
        "\n\nOurs: plan_resume (verify sha256) + Trainer setup (data from the datasets cache, model, "
        "optimizer load, O(1) sampler seek) to the first logged step, in a fresh process, torch import "
        "excluded. Synthetic checkpoints: a real step-2 checkpoint with trainer_state step/cursor/tokens "
        "rewritten and the manifest re-hashed. HF: only the batch skip itself (no model or optimizer "
        "load), on a dataset long enough for step N to be in epoch 0 — HF skips "
        "`global_step % steps_per_epoch` batches, so on a corpus as small as tinyshakespeare "
        f"(~150 batches/epoch) it would skip at most that. {C.threads_note()}. "
        f"Load average at the end: {C.load_avg()}."
    )
    C.publish("resume_cost", text)


if __name__ == "__main__":
    main()

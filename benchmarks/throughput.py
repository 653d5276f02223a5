"""1. Throughput (tokens/s): bare PyTorch loop vs our engine (in-process and CLI headless) vs our engine
with the app open in a real pseudo-terminal (tmux, 120x40) vs transformers.Trainer.

Same model (GPT2LMHeadModel, the default 4x128 config), same packed blocks (engine.data.prepare_data),
batch 16 x block 128, fp32, the same AdamW param groups (decay on matrices only), clip 1.0, the same
cosine LR. Every side runs WARMUP steps, then MEASURE steps are timed; sides are interleaved (the order
rotates each repeat) and each runs in a fresh process.

On the CPU the engine raises glibc's malloc trim/mmap thresholds (engine/host_allocator.py), which makes any
loop ~12 % faster here. The reference is therefore the bare loop with the same two mallopt() calls, so the
ratios measure the engine's and the app's overhead, not the allocator; the bare loop as a user writes it
(glibc defaults) and transformers.Trainer (also glibc defaults) are shown beside it.
Run: python benchmarks/throughput.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import _common as C


def tokens_per_step(cfg) -> int:  # type: ignore[no-untyped-def]
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size


# ---------------------------------------------------------------- the reference: a bare loop


def build_reference(cfg, precision: str = "fp32", device: str = "cpu"):  # type: ignore[no-untyped-def]
    """The loop a user writes by hand, from the same data, model config and optimizer groups. On a GPU the
    blocks and the model live on it and AdamW is fused, as in the engine (engine/run_setup.py, model.py)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tui_trainer.engine.data import prepare_data

    data = prepare_data(cfg, None)
    m, o = cfg.model, cfg.optim
    torch.manual_seed(cfg.train.seed)
    eos = data.tokenizer.eos_token_id
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.block_size,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            bos_token_id=eos,
            eos_token_id=eos,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
        )
    )
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    dev = torch.device(device)
    model.to(dev)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=dev.type == "cuda" or None)
    return data.train.to(dev), model, opt


def cosine_lr(step: int, cfg) -> float:  # type: ignore[no-untyped-def]
    import math

    o, max_steps = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def bare_loop(  # type: ignore[no-untyped-def]
    cfg, warmup: int, measure: int, precision: str = "fp32", parts=None, compile_model: bool = False
) -> dict:
    """`parts` (blocks, model, optimizer) from build_reference; their device is the loop's. `compile_model`
    wraps the model in torch.compile as a user would (the warmup steps absorb the compilation)."""
    import torch

    blocks, model, opt = parts or build_reference(cfg)
    device = blocks.device
    cuda = device.type == "cuda"
    B, clip = cfg.train.batch_size, cfg.optim.grad_clip
    gen = torch.Generator().manual_seed(cfg.train.seed)
    perm, pos = torch.randperm(len(blocks), generator=gen), 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    forward = torch.compile(model) if compile_model else model
    model.train()
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    marks = []
    for step in range(warmup + measure):
        if step == warmup:
            if cuda:  # the warmup's queued kernels are not the timed window's
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        if step >= warmup:
            marks.append(time.perf_counter())
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        if pos + B > len(blocks):
            perm, pos = torch.randperm(len(blocks), generator=gen), 0
        x = blocks[perm[pos : pos + B].to(device, non_blocking=True)]
        pos += B
        with autocast:
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    last_loss = loss.item()  # on a GPU: the one host sync, after the last step's kernels
    end = time.perf_counter()
    span = end - t0
    marks.append(end)
    return {
        "tokens_per_s": measure * tokens_per_step(cfg) / span,
        "steps": measure,
        "loss": last_loss,
        "median_step_s": statistics.median(b - a for a, b in itertools.pairwise(marks)),
    }


# ---------------------------------------------------------------- our engine in-process


def engine_inprocess(cfg, warmup: int, measure: int) -> dict:  # type: ignore[no-untyped-def]
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    store = RunStore(C.fresh_dir("tp-engine"))
    trainer = Trainer(store, plan_train(store, cfg, "tp"), until_step=warmup + measure)
    trainer.run()
    metrics = C.read_jsonl(store.metrics_path("tp"))
    return C.steady_tokens_per_s(metrics, warmup, tokens_per_step(cfg))


def hf_trainer(cfg, warmup: int, measure: int) -> dict:  # type: ignore[no-untyped-def]
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    blocks, model, opt = build_reference(cfg)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg) / cfg.optim.lr)
    args = TrainingArguments(
        output_dir=str(C.fresh_dir("tp-hf")),
        per_device_train_batch_size=cfg.train.batch_size,
        max_steps=warmup + measure,
        max_grad_norm=cfg.optim.grad_clip,
        seed=cfg.train.seed,
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), optimizers=(opt, sched), callbacks=[Clock()])
    out = trainer.train()
    span = times[-1] - times[warmup - 1]
    sps = out.metrics.get("train_samples_per_second", float("nan"))
    return {
        "tokens_per_s": measure * tokens_per_step(cfg) / span,
        "steps": measure,
        "median_step_s": statistics.median([b - a for a, b in zip(times[warmup - 1 :], times[warmup:], strict=False)]),
        # HF's own figure counts the whole train() call (setup and warmup steps included)
        "hf_reported_tokens_per_s": sps * cfg.model.block_size,
    }


# ---------------------------------------------------------------- our engine through the CLI / the app


def engine_cli(warmup: int, measure: int) -> dict:
    runs = C.fresh_dir("tp-cli")
    cmd = [
        C.TUI,
        "train",
        "--headless",
        "--run",
        "tp",
        "--runs-dir",
        str(runs),
        "--until-step",
        str(warmup + measure),
        *C.set_args(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=C.ROOT, timeout=900)
    cfg = C.bench_config()
    return C.steady_tokens_per_s(C.read_jsonl(runs / "tp" / "metrics.jsonl"), warmup, tokens_per_step(cfg))


def engine_app(warmup: int, measure: int, width: int = 120, height: int = 40) -> dict:
    """`tui-trainer train` (the app) in a real pty under tmux; throughput read from metrics.jsonl."""
    runs = C.fresh_dir("tp-app")
    until = warmup + measure
    cmd = [C.TUI, "train", "--run", "tp", "--runs-dir", str(runs), "--until-step", str(until), *C.set_args()]
    tmux = C.pane(cmd, width, height)
    record = runs / "tp" / "run.json"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                if json.loads(record.read_text()).get("status") in ("paused", "failed", "finished"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        screen = tmux.text()
        tmux.send("q")
        time.sleep(1.0)
    finally:
        tmux.close()
    cfg = C.bench_config()
    result = C.steady_tokens_per_s(C.read_jsonl(runs / "tp" / "metrics.jsonl"), warmup, tokens_per_step(cfg))
    result["screen_ok"] = "tp" in screen
    return result


# ---------------------------------------------------------------- main


def bare_loop_same_allocator(cfg, warmup: int, measure: int) -> dict:  # type: ignore[no-untyped-def]
    """The bare loop with the malloc thresholds the engine sets on the CPU: the fair reference for overhead."""
    from tui_trainer.engine import host_allocator

    assert host_allocator.keep_freed_memory_for_reuse(), "malloc thresholds not raised: not glibc, or MALLOC_* set"
    return bare_loop(cfg, warmup, measure)


def run_worker(argv: list[str]) -> None:
    side, warmup, measure = argv[0], int(argv[1]), int(argv[2])
    cfg = C.bench_config()
    fn = {"bare": bare_loop, "bare-tuned": bare_loop_same_allocator, "engine": engine_inprocess, "hf": hf_trainer}[side]
    C.emit(fn(cfg, warmup, measure))


SIDE_KEYS = ("bare-tuned", "bare", "engine", "cli", "app", "hf")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return run_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--sides",
        default=",".join(SIDE_KEYS),
        help=f"comma-separated subset of {','.join(SIDE_KEYS)} (the reference, bare-tuned, always runs): "
        "fewer sides leave time for more repeats of the ones a target is about",
    )
    args = ap.parse_args()
    C.apply_common(args)
    warmup = args.warmup or (3 if args.quick else 10)
    measure = args.steps or (10 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 3)
    w, m = str(warmup), str(measure)
    reference = "bare loop, engine's malloc thresholds (reference)"
    all_sides = {
        "bare-tuned": (reference, lambda: C.worker("throughput.py", ["bare-tuned", w, m])),
        "bare": ("bare PyTorch loop as written (glibc defaults)", lambda: C.worker("throughput.py", ["bare", w, m])),
        "engine": ("engine, in-process Trainer", lambda: C.worker("throughput.py", ["engine", w, m])),
        "cli": ("engine, CLI --headless", lambda: engine_cli(warmup, measure)),
        "app": ("engine + app in a pty (tmux 120x40)", lambda: engine_app(warmup, measure)),
        "hf": ("transformers.Trainer", lambda: C.worker("throughput.py", ["hf", w, m])),
    }
    chosen = {"bare-tuned", *(key.strip() for key in args.sides.split(",") if key.strip())}
    unknown = chosen - set(all_sides)
    if unknown:
        ap.error(f"--sides: unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIDE_KEYS)}")
    sides = dict(all_sides[key] for key in SIDE_KEYS if key in chosen)
    print(
        f"throughput: {repeats} interleaved repeats, {warmup} warmup + {measure} timed steps each (load {C.load_avg()})"
    )
    results = C.interleave(sides, repeats)
    ref = C.median([r["tokens_per_s"] for r in results[reference]])
    ref_step = C.median([r["median_step_s"] for r in results[reference]])
    targets = {
        "engine, in-process Trainer": 0.97,
        "engine, CLI --headless": 0.97,
        "engine + app in a pty (tmux 120x40)": 0.95,
        "transformers.Trainer": None,
    }
    rows = []
    for name, rs in results.items():
        tps = [r["tokens_per_s"] for r in rs]
        med = C.median(tps)
        target = targets.get(name)
        ratio = med / ref
        verdict = (
            "reference"
            if name == reference
            else ""
            if name.startswith("bare")
            else (("met" if ratio >= target else f"MISSED by {target - ratio:.3f}") if target else "")
        )
        step = C.median([r["median_step_s"] for r in rs])
        rows.append(
            [
                name,
                med,
                C.spread(tps),
                step * 1000,
                f"{ratio:.3f}",
                f"{ref_step / step:.3f}",
                f"≥ {target}" if target else ("—" if name.startswith("bare") else "below ours"),
                verdict,
            ]
        )
    hf = results.get("transformers.Trainer")
    ours_side = results.get("engine, in-process Trainer")
    for row in rows:
        if row[0] == "transformers.Trainer" and hf and ours_side:
            ours = C.median([r["tokens_per_s"] for r in ours_side])
            hf_med = C.median([r["tokens_per_s"] for r in hf])
            ours_step = C.median([r["median_step_s"] for r in ours_side])
            hf_step = C.median([r["median_step_s"] for r in hf])
            row[7] = ("ours ahead" if ours > hf_med else f"HF ahead by {hf_med / ours - 1:.1%}") + (
                f" (median step: ours {ours_step * 1000:.0f} ms, HF {hf_step * 1000:.0f} ms)"
            )
    text = C.table(
        [
            "side",
            "tokens/s (median)",
            "range",
            "median step (ms)",
            "× bare (tokens/s)",
            "× bare (median step)",
            "target",
            "verdict",
        ],
        rows,
    )
    text += (
        "\n\nVerdicts use the tokens/s ratio (wall time over the window, everything included). The "
        "median-step ratio (bare median step / side median step) is robust to the load spikes of a shared "
        "machine; when the two disagree, the gap is noise, not overhead."
    )
    text += "\n\nEach repeat's tokens/s (repeat 1, 2, …):\n" + "\n".join(
        f"- {name}: " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs) for name, rs in results.items()
    )
    if hf:
        hf_rep = C.median([r["hf_reported_tokens_per_s"] for r in hf])
        text += (
            f"\n\nHF Trainer's own `train_samples_per_second` × block_size (whole `train()` call, setup and "
            f"warmup included): {hf_rep:,.0f} tokens/s ({hf_rep / ref:.3f} × bare)."
        )
    text += (
        "\n"
        f"{repeats} interleaved repeats × ({warmup} warmup + {measure} timed steps), batch "
        f"{C.bench_config().train.batch_size} × block {C.bench_config().model.block_size}, fp32, CPU, "
        f"{C.threads_note()}. "
        f"Load average at the end: {C.load_avg()}."
    )
    C.publish("throughput", text)


if __name__ == "__main__":
    main()

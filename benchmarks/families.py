"""Model families and LoRA (issue 23): a Llama-family model of ~124M parameters, loaded from a local dir
as a user's own would be, trained by a bare PyTorch loop vs our engine (full fine-tuning), and by a bare
peft loop vs our engine with lora.r=16. Beside each engine side: its checkpoint's size, the save stall (how
long the loop waited for the checkpoint) and the process's peak RSS.

The base dir is built once (AutoModelForCausalLM.from_config(...).save_pretrained, with the corpus BPE as its
tokenizer): hidden 768, 17 layers, 12 heads, MLP 2048, 4096 tokens = ~124M parameters. Same packed blocks
(engine.data.prepare_data with that tokenizer), batch 16 x block 128, fp32 (--precision bf16 on a GPU), the
same AdamW groups, clip 1.0, cosine lr; WARMUP steps, then MEASURE timed steps; sides interleaved, each in a
fresh process. The targets: engine >= 0.97 x bare loop, engine LoRA >= 0.97 x bare peft loop.
Run: python benchmarks/families.py [--quick] [--repeats N] [--device cpu|cuda] [--precision fp32|bf16]
     [--batch B] [--warmup W] [--measure M]   (on 2 CPU cores: --batch 4 --warmup 2 --measure 8 --repeats 2)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import throughput as T

LLAMA_124M = {"hidden_size": 768, "num_hidden_layers": 17, "num_attention_heads": 12, "intermediate_size": 2048}
LLAMA_QUICK = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
LORA_R = 16
SIDES = ("bare", "engine", "bare-lora", "engine-lora")


def base_dir() -> Path:
    """The ~124M Llama dir (built once per size; reused by every side and repeat)."""
    path = C.WORK / ("families-base-quick" if C.quick() else "families-base")
    if (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tui_trainer.engine.data import prepare_data

    tokenizer = prepare_data(C.bench_config(), None).tokenizer
    shape = LLAMA_QUICK if C.quick() else LLAMA_124M
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        num_key_value_heads=shape["num_attention_heads"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config_for(base: Path, lora: bool, precision: str, device: str, save_at: int, batch: int | None):  # type: ignore[no-untyped-def]
    extra = [f"model.pretrained={str(base)!r}", f"train.precision={precision!r}", f"train.device={device!r}"]
    if batch:
        extra.append(f"train.batch_size={batch}")
    extra.append(f"checkpoint.every_steps={save_at}")
    if lora:
        extra.append(f"lora.r={LORA_R}")
    return C.bench_config(extra)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bare(cfg, lora: bool, warmup: int, measure: int, precision: str, device: str) -> dict:  # type: ignore[no-untyped-def]
    """The loop a user writes: from_pretrained, (get_peft_model,) AdamW over the trainable parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    from tui_trainer.engine.data import prepare_data
    from tui_trainer.engine.tokenizer import load_tokenizer

    data = prepare_data(cfg, load_tokenizer(cfg.model.pretrained, "base"))
    # the config's dropout must be given at load time: Llama's attention reads it when it is built
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.pretrained, dtype=torch.float32, attention_dropout=cfg.model.dropout
    )
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.train.seed)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # engine/models/llama.py's default
        lora_config = LoraConfig(
            r=LORA_R,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,  # the engine's default (0.05): same work on both sides
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    dev = torch.device(device)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=dev.type == "cuda" or None)
    result = T.bare_loop(cfg, warmup, measure, precision, parts=(data.train.to(dev), model, opt))
    return {**result, "peak_rss": peak_rss_bytes()}


def engine(cfg, warmup: int, measure: int) -> dict:  # type: ignore[no-untyped-def]
    """Our engine in-process to WARMUP + MEASURE; a periodic (async) save at that last step, after its
    timing was logged, gives the checkpoint's size and the stall the loop saw; the pause then waits for it."""
    from tui_trainer.core.events import CheckpointSaved
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    store = RunStore(C.fresh_dir("families-engine"))
    saved: list[CheckpointSaved] = []
    trainer = Trainer(
        store,
        plan_train(store, cfg, "fam"),
        lambda e: saved.append(e) if isinstance(e, CheckpointSaved) else None,
        until_step=warmup + measure,
    )
    trainer.run()
    metrics = C.read_jsonl(store.metrics_path("fam"))
    result = C.steady_tokens_per_s(metrics, warmup, T.tokens_per_step(cfg))
    last = saved[-1]
    return {**result, "checkpoint_bytes": last.bytes, "stall_s": last.stall_s, "peak_rss": peak_rss_bytes()}


def run_worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=SIDES)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--measure", type=int, required=True)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None)
    C.common_args(ap)
    args = ap.parse_args(argv)
    C.apply_common(args)
    lora = args.side.endswith("lora")
    cfg = config_for(base_dir(), lora, args.precision, args.device, args.warmup + args.measure, args.batch)
    if args.side.startswith("bare"):
        C.emit(bare(cfg, lora, args.warmup, args.measure, args.precision, args.device))
    else:
        C.emit(engine(cfg, args.warmup, args.measure))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        run_worker(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=None, help="train.batch_size (default: the config's 16)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 5)")
    ap.add_argument("--measure", type=int, default=None, help="timed steps per side (default 30)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    warmup, measure = (2, 4) if C.quick() else (5, 30)
    warmup, measure = args.warmup or warmup, args.measure or measure
    base = base_dir()  # built here, before any timing, so no side pays for it
    print(f"base: {base} ({C.threads_note()}, {args.device}, {args.precision})")
    common = ["--warmup", str(warmup), "--measure", str(measure), "--precision", args.precision]
    common += ["--device", args.device, *(["--quick"] if C.quick() else [])]
    common += ["--batch", str(args.batch)] if args.batch else []
    chosen = [s for s in SIDES if s in args.sides.split(",")]
    sides = {side: (lambda side=side: C.worker("families.py", [side, *common])) for side in chosen}
    t0 = time.perf_counter()
    results = C.interleave(sides, args.repeats or (1 if C.quick() else 4))
    rows = []
    for side, reference in (("engine", "bare"), ("engine-lora", "bare-lora")):
        if side not in results or reference not in results:
            continue
        ratios = [e["tokens_per_s"] / b["tokens_per_s"] for e, b in zip(results[side], results[reference], strict=True)]
        # the median step is robust to one slow step (this VM's neighbours): the ratio of medians beside it
        step_ratios = [
            b["median_step_s"] / e["median_step_s"] for e, b in zip(results[side], results[reference], strict=True)
        ]
        mine = results[side]
        rows.append(
            [
                side,
                f"{C.median([r['tokens_per_s'] for r in results[reference]]):,.0f}",
                f"{C.median([r['tokens_per_s'] for r in mine]):,.0f}",
                f"{C.median(ratios):.3f} {C.spread(ratios)}",
                f"{C.median(step_ratios):.3f} {C.spread(step_ratios)}",
                f"{C.median([r['checkpoint_bytes'] for r in mine]) / 2**20:,.1f} MiB",
                f"{C.median([r['stall_s'] for r in mine]) * 1000:,.0f} ms",
                f"{C.median([r['peak_rss'] for r in mine]) / 2**30:.2f} GiB",
                f"{C.median([r['peak_rss'] for r in results[reference]]) / 2**30:.2f} GiB",
            ]
        )
    for side in results:
        print(f"{side}: tokens/s per repeat " + " ".join(f"{r['tokens_per_s']:,.0f}" for r in results[side]))
    headers = [
        "engine side",
        "bare tok/s",
        "engine tok/s",
        "ratio",
        "ratio (median step)",
        "checkpoint",
        "save stall",
        "RSS",
        "bare RSS",
    ]
    print(C.table(headers, rows))
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "machine": C.machine_info()}))


if __name__ == "__main__":
    main()

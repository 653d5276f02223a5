"""7. Real size: checkpoints of a GPT-2 124M (12 x 768, 12 heads, vocab 50304; weights + AdamW state), on CPU.

Measured in one run, each side in a fresh subprocess:
- disk: `dd if=/dev/zero bs=1M count=N conv=fsync` into the same directory the checkpoints go to;
- our sync write: `checkpoint_save.write` of a captured state (what a sync save / pause does: fsync'd files,
  checksums, manifest last, atomic rename), and a hand-written `save_file` + `torch.save` + fsync of the same
  state, each the median of 3;
- async effective cost: the engine trains N steps saving every E steps (async, the default) and the same N
  steps with no saves; (span of the saving run - span of the plain run) / saves, span = the wall time
  between the first and last step's metrics lines. Once with torch on 1 thread (a core left for the writer),
  once on 2. Beside it the engine's own `stall_s` (what the training thread waited per save);
- peak RSS (ru_maxrss) of the training process with and without saves, and of the writer process;
- resume -> first new step vs a fresh start -> first step (plan + setup + one step, torch already imported).
Run: python benchmarks/checkpoint_124m.py [--repeats N] [--quick]   (about 6 minutes per repeat on 2 cores)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from checkpoint_cost import disk_bandwidth

SHAPE = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.vocab_size=50304"]
QUICK_SHAPE = ["model.n_layer=2", "model.n_head=4", "model.n_embd=256", "model.vocab_size=8192"]
RUN_SET = ["model.block_size=64", "train.batch_size=1", "model.dropout=0.0"]
FULL_VOCAB, QUICK_VOCAB = 50304, 8192  # GPT-2's 50257 padded to a multiple of 64, as the engine pads
CORPUS_MB = 10  # the venv's Python sources: enough distinct text for a BPE of 50,257 tokens
EVERY, SAVES, TAIL = 4, 3, 4  # saves at 4, 8, 12; 4 more steps so the last write ends inside the span


def shape() -> list[str]:
    return QUICK_SHAPE if C.quick() else SHAPE


def vocab() -> int:
    return QUICK_VOCAB if C.quick() else FULL_VOCAB


def corpus() -> list[str]:
    """The engine runs' data: a model's vocabulary follows its trained tokenizer, and on tinyshakespeare
    the BPE stops at ~21k tokens (a smaller model than GPT-2's); this corpus reaches the full vocabulary.
    --quick: tinyshakespeare, which reaches the quick shape's 8,192 tokens and tokenizes in a second."""
    from data_prep import build_corpus

    if C.quick():
        return [f"data.path='{C.ROOT / 'sample_data' / 'tinyshakespeare.txt'}'"]
    return [f"data.path='{build_corpus(CORPUS_MB)}'"]


def build_state(threads: int):  # -> (model, optimizer, tokenizer)
    """The 124M model and AdamW after one step (so its moment buffers exist), and a small tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tui_trainer.engine import models as families
    from tui_trainer.engine.model import make_optimizer

    torch.set_num_threads(threads)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["to be or not to be"] * 10, trainers.BpeTrainer(vocab_size=300))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    cfg = C.bench_config([*shape(), *RUN_SET])
    model = families.new_model(cfg, vocab(), tokenizer.eos_token_id)  # the shape a 50k tokenizer gives
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 300, (1, 64))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, tokenizer


def writes_worker(out: Path) -> dict:
    """Our sync write vs save_file + torch.save + fsync of the same state, 3 each, alternating."""
    import torch
    from safetensors.torch import save_file

    from tui_trainer.core.store import RunStore, fsync_path
    from tui_trainer.engine import checkpoint_save
    from tui_trainer.engine.checkpoint_components import ModelState, OptimizerState, RngState, RunRecord, TokenizerFiles
    from tui_trainer.engine.components import Components
    from tui_trainer.engine.distributed import Dist

    model, opt, tokenizer = build_state(2)
    store = RunStore(out / "runs")
    ours, plain, size = [], [], 0
    for i in range(3):
        t0 = time.perf_counter()
        components = Components(
            ModelState(model, torch.device("cpu")),
            OptimizerState(opt, C.bench_config([*shape(), *RUN_SET])),
            TokenizerFiles(tokenizer),
            RunRecord({"step": i}),
            RngState(Dist.single(torch.device("cpu"))),
        )
        snap = checkpoint_save.capture(components, step=i, manifest_meta={})
        path = checkpoint_save.write(store, "w", snap)
        ours.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
        d = out / f"plain-{i}"
        d.mkdir()
        t0 = time.perf_counter()
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        save_file(state, str(d / "model.safetensors"))
        torch.save(opt.state_dict(), d / "optimizer.pt")
        for f in d.iterdir():
            fsync_path(f)
        fsync_path(d)
        plain.append(time.perf_counter() - t0)
    return {"ours_s": statistics.median(ours), "plain_s": statistics.median(plain), "bytes": size}


def train_worker(runs: Path, threads: int, saves: bool, configured: bool = True, extra: Sequence[str] = ()) -> dict:
    """Fresh start -> first step, then N steps (saving every EVERY, or not at all), then pause.
    `configured=False`: no periodic saving at all (no writer process, no staging): the training-only peak.
    `extra`: more overrides, applied last (benchmarks/gpu_check.py: bf16, sync saves)."""
    import torch

    from tui_trainer.core.events import CheckpointSaved, Notice, StepLogged
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    torch.set_num_threads(threads)
    # The run without saves still has periodic saving configured (every 1000 minutes: never due), so both
    # runs start the same way (writer process, staging buffers) and only the saves themselves differ.
    every = EVERY if saves else 0
    minutes = 1000 if configured else 0
    ckpt = [f"checkpoint.every_steps={every}", f"checkpoint.every_minutes={minutes}", "checkpoint.keep_last=2"]
    cfg = C.bench_config([*shape(), *RUN_SET, *ckpt, *corpus(), *extra])
    store = RunStore(runs)
    saved: list[CheckpointSaved] = []
    first: list[float] = []
    notices: list[str] = []

    def sink(event: object) -> None:
        if isinstance(event, CheckpointSaved):
            saved.append(event)
        elif isinstance(event, Notice):
            notices.append(event.message)
        elif isinstance(event, StepLogged) and not first:
            first.append(time.perf_counter())

    steps = EVERY * SAVES + TAIL
    t0 = time.perf_counter()
    trainer = Trainer(store, plan_train(store, cfg, "m"), sink, until_step=steps)
    trainer.run()
    built = trainer.parts.model.config.vocab_size
    assert built == vocab(), f"the model got a vocabulary of {built}, not {vocab()}: not the shape measured"
    metrics = [r for r in C.read_jsonl(store.metrics_path("m")) if "loss" in r]
    periodic = [e for e in saved if e.step < steps]
    return {
        "span_s": metrics[-1]["time"] - metrics[0]["time"],
        "start_to_first_step_s": first[0] - t0,
        "saves": len(periodic),
        "stall_s": statistics.median([e.stall_s for e in periodic]) if periodic else 0.0,
        "stalls_s": [e.stall_s for e in periodic],  # in order: the first waits for no earlier write
        "write_s": statistics.median([e.seconds for e in periodic]) if periodic else 0.0,
        "bytes": saved[-1].bytes if saved else 0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "writer_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "notices": notices,
    }


def resume_worker(runs: Path, threads: int) -> dict:
    """`resume m` -> its first new step (plan verifies, setup loads), torch already imported."""
    import torch

    from tui_trainer.core.events import StepLogged
    from tui_trainer.core.plan import plan_resume
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    torch.set_num_threads(threads)
    store = RunStore(runs)
    t0 = time.perf_counter()
    first: list[float] = []
    trainer = Trainer(store, plan_resume(store, "m"))

    def sink(event: object) -> None:
        if isinstance(event, StepLogged):
            first.append(time.perf_counter())
            trainer.stop()

    trainer.sink = sink
    trainer.run()
    return {"resume_to_first_step_s": first[0] - t0}


def run_worker(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "writes":
        C.emit(writes_worker(Path(argv[1])))
    elif kind == "train":
        C.emit(train_worker(Path(argv[1]), int(argv[2]), argv[3] == "1"))
    elif kind == "unsaved":
        C.emit(train_worker(Path(argv[1]), 1, False, configured=False))
    else:
        C.emit(resume_worker(Path(argv[1]), int(argv[2])))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return run_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    args = ap.parse_args()
    C.apply_common(args)
    repeats = args.repeats or 1
    load_before = C.load_avg()
    print(f"checkpoint 124m: {repeats} repeat(s) (load {load_before})")
    dd_mb = 256 if C.quick() else 1536
    dd = disk_bandwidth(dd_mb)
    writes = C.worker("checkpoint_124m.py", ["writes", str(C.fresh_dir("ck124-writes"))])
    # one run first, unmeasured: it tokenizes the corpus, so every measured start finds the data cached
    C.worker("checkpoint_124m.py", ["unsaved", str(C.fresh_dir("ck124-warm"))])
    train: dict[str, list[dict]] = {}
    sides = {}
    for threads in (1, 2):
        for saves in (True, False):
            key = f"{threads}|{int(saves)}"
            sides[key] = lambda t=threads, s=saves, k=key: C.worker(
                "checkpoint_124m.py", ["train", str(C.fresh_dir(f"ck124-{k.replace('|', '-')}")), str(t), str(int(s))]
            )
    sides["unsaved"] = lambda: C.worker("checkpoint_124m.py", ["unsaved", str(C.fresh_dir("ck124-unsaved"))])
    train = C.interleave(sides, repeats)
    rss_training = C.median([w["rss_mb"] for w in train.pop("unsaved")])
    for key, results in train.items():  # every run, not just the medians: the machine is shared and noisy
        for r in results:
            print(f"  raw {key}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items() if isinstance(v, (int, float))))
    # resume the run that saved (its pause at the last step left a checkpoint), per thread count
    resume = {
        t: C.worker("checkpoint_124m.py", ["resume", str(C.WORK / f"ck124-{t}-1"), str(t)])["resume_to_first_step_s"]
        for t in (1, 2)
    }
    size = writes["bytes"]
    sync_s = writes["ours_s"]

    def row(name: str, seconds: float | None, mbps: float, side: str) -> list[str]:
        return [name, "—" if seconds is None else f"{seconds:.2f}", f"{mbps:,.0f}", f"{mbps / dd:.2f}", side]

    rows = [
        row("disk: dd bs=1M conv=fsync", None, dd, f"`dd ... count={dd_mb} conv=fsync`"),
        row("our sync write (checkpoint_save.write)", sync_s, size / sync_s / 1e6, "writes worker"),
        row("save_file + torch.save + fsync", writes["plain_s"], size / writes["plain_s"] / 1e6, "writes worker"),
    ]
    what = "quick shape" if C.quick() else "GPT-2 124M"
    text = f"Checkpoint {size / 1e9:.2f} GB ({what}, weights + AdamW state).\n\n"
    text += C.table(["write", "seconds", "MB/s", "× dd", "side"], rows)
    arows = []
    for threads in (1, 2):
        with_saves, without = train[f"{threads}|1"], train[f"{threads}|0"]
        extra = C.median([w["span_s"] for w in with_saves]) - C.median([w["span_s"] for w in without])
        per_save = extra / with_saves[0]["saves"]
        stall = C.median([w["stall_s"] for w in with_saves])
        rss_with = C.median([w["rss_mb"] for w in with_saves])
        rss_without = C.median([w["rss_mb"] for w in without])
        fresh = C.median([w["start_to_first_step_s"] for w in without])
        arows.append(
            [
                threads,
                f"{per_save:.2f}",
                f"{per_save / sync_s:.2f}",
                f"{stall:.2f}",
                f"{C.median([w['write_s'] for w in with_saves]):.2f}",
                f"{rss_without:,.0f}",
                f"{rss_with:,.0f}",
                f"{(rss_with - rss_training) * 2**20 / size:.2f}",
                f"{C.median([w['writer_rss_mb'] for w in with_saves]):,.0f}",
                f"{resume[threads]:.1f}",
                f"{fresh:.1f}",
                f"{resume[threads] / fresh:.2f}",
            ]
        )
    text += "\n\n" + C.table(
        [
            "torch threads",
            "async effective cost / save (s)",
            "× sync write",
            "engine stall_s / save (s)",
            "background write (s)",
            "peak RSS, saving configured, none due (MB)",
            "peak RSS, async saves (MB)",
            "(async − training-only) / ckpt size",
            "largest child process (the writer) peak RSS (MB)",
            "resume → first step (s)",
            "fresh start → first step (s)",
            "resume × fresh",
        ],
        arows,
    )
    steps = EVERY * SAVES + TAIL
    text += (
        f"\n\nEngine runs: {steps} steps, batch 1 × block 64, a save every {EVERY} steps ({SAVES} saves inside "
        f"the span), {repeats} repeat(s), medians. Effective cost = (span with saves − span without) / saves; "
        f"it carries the machine's step-time noise. RSS counts the shared-memory staging buffers (one "
        f"checkpoint's worth, allocated once, after the first step, whenever periodic saving is configured). "
        f"Training-only peak RSS (no periodic saving: no staging, no writer process, 1 thread): "
        f"{rss_training:,.0f} MB. Load average before: {load_before}; after: {C.load_avg()}."
    )
    C.publish("checkpoint_124m", text)


if __name__ == "__main__":
    main()

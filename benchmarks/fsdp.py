"""FSDP vs DDP (issue 25): memory per rank, speed, and what a sharded save costs, on 2 CPU ranks (gloo).

Each side is a fresh `torchrun --standalone --nproc-per-node 2` job running this script's worker, which
trains the GPT-2 124M shape (12 x 768, 12 heads, vocab 50304, block 64, batch 1 per rank, 2 micro-batches,
AdamW, clip 1.0, random tokens) with the engine's own pieces: `engine/fsdp.py` `build_sharded` (fully_shard
per block, then the root) for fsdp, DistributedDataParallel for ddp, the engine's optimizer (`make_optimizer`),
`Dist.no_sync` and the clip (`sampling.grad_norm`). Sides are interleaved (ddp fsdp ddp fsdp ...).
- peak RSS per rank (ru_maxrss at the end), each side built and with malloc tuned as the engine does it:
  ddp builds the whole model on every rank; fsdp (`fsdp.build_sharded`) builds it whole on rank 0 only, the
  other rank a meta-device skeleton that materialises just its shards and gets rank 0's weights by broadcast;
  `host_allocator.keep_freed_memory_for_reuse` (fsdp: `sharded=True`, large blocks mmap()ed);
- RSS per rank at each phase (after the model is built and sharded, once the optimizer exists, after step 1
  and after the last step, after the sharded save) and the peak up to it (VmRSS / VmHWM);
- tokens/s over the steps after a warmup (global tokens / wall time), FSDP ÷ DDP;
- fsdp only: a blocking sharded save as the engine makes it (`sharded_checkpoint.write_shards`: every rank
  writes its shards with DCP, fsync, checksums of its own files, DCP's index; a pause, the end, async saves
  off) = the stall; its bytes and bandwidth, against every rank writing the same number of bytes to a plain
  file with one write + fsync, in parallel;
- fsdp only: a background sharded save as the engine makes it at a periodic save (engine/async_shards.py:
  every rank stages its shards and DCP's async path writes them on its own gloo group): the stall (staging
  and starting the write, the slower rank) of the first save (staging buffers allocated) and of the next
  (buffers reused), and the seconds until every rank's write and the index are done.
- fsdp only: `export` of those shards (`safetensors_stream.write_model_weights`, fp32) in a fresh process: its
  peak RSS above the process's own before the export (Linux: VmHWM reset through /proc/self/clear_refs after
  the imports), ÷ the model's bytes (streamed tensor by tensor, it should stay far below 1), and its seconds.
Run: python benchmarks/fsdp.py [--quick] [--repeats N] [--threads N] [--sides ddp,fsdp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}
QUICK_SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 256, "vocab_size": 8192}
BLOCK, BATCH, ACCUM = 64, 1, 2
STEPS, WARMUP = 12, 3
QUICK_STEPS, QUICK_WARMUP = 4, 1


def memory_now() -> tuple[float, float]:
    """(RSS, peak RSS so far) of this process in MB, from /proc (VmRSS, VmHWM)."""
    got = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def worker(side: str, steps: int, warmup: int) -> None:
    """Under torchrun: train `steps` steps on `side` (ddp | fsdp), then (fsdp) save once; rank 0 emits."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tui_trainer.core.config import Config
    from tui_trainer.engine import distributed, fsdp, host_allocator, models, sampling, sharded_checkpoint
    from tui_trainer.engine.device import resolve_device
    from tui_trainer.engine.model import make_optimizer

    shape = QUICK_SHAPE if C.quick() else SHAPE
    with distributed.joined() as d:
        device = d.place("cpu", resolve_device)
        host_allocator.keep_freed_memory_for_reuse(sharded=side == "fsdp")  # as run_setup.training_device
        torch.manual_seed(0)
        config = GPT2Config(**shape, n_positions=BLOCK, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        run_config = Config().with_overrides([f"train.parallel={side}"])

        def build(skeleton: bool) -> torch.nn.Module:
            with models.parameters_on_meta() if skeleton else contextlib.nullcontext():
                return GPT2LMHeadModel(config)

        if side == "fsdp":
            model = fsdp.build_sharded(build, d, device, "fp32", from_rank0=True)
        else:
            model = build(skeleton=False)
        phases = [("built" + (" and sharded" if side == "fsdp" else ""), *memory_now())]
        optimizer = make_optimizer(model, run_config, device)
        wrapped = d.wrap(model)
        phases.append(("optimizer built, model wrapped", *memory_now()))
        gen = torch.Generator().manual_seed(d.rank)
        start = 0.0
        for step in range(steps):
            if step == warmup:
                d.barrier()
                start = time.perf_counter()
            for micro in range(ACCUM):
                x = torch.randint(0, shape["vocab_size"], (BATCH, BLOCK), generator=gen)
                with d.no_sync(wrapped, last_micro_batch=micro == ACCUM - 1):
                    (wrapped(input_ids=x, labels=x).loss / ACCUM).backward()
            sampling.grad_norm(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step in (0, steps - 1):
                phases.append(
                    (f"after step {step + 1} ({'AdamW state made' if step == 0 else 'the last'})", *memory_now())
                )
        d.barrier()
        seconds = time.perf_counter() - start
        tokens = (steps - warmup) * BATCH * ACCUM * BLOCK * d.world_size
        result = {
            "tokens_per_s": tokens / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if side == "fsdp":
            result.update(_save_costs(d, model, optimizer, sharded_checkpoint))
            phases.append(("after a sharded save", *memory_now()))
        result["phases"] = phases
        every = d.gather_objects(result)
        if d.is_main:
            C.emit({"ranks": every})


def _save_costs(d, model, optimizer, sharded_checkpoint) -> dict:
    """The engine's sharded save (the stall), and a plain parallel write of the same bytes per rank."""

    root = Path(d.broadcast_object(tempfile.mkdtemp(prefix="fsdp-bench-", dir=C.WORK) if d.is_main else None))
    d.barrier()
    start = time.perf_counter()
    shards, _ = sharded_checkpoint.write_shards(root, d, model, optimizer, 0)
    d.barrier()
    stall = time.perf_counter() - start
    background = _background_saves(d, root, model, optimizer, sharded_checkpoint)
    mine = sum(p.stat().st_size for p in shards.iterdir() if p.name.startswith(f"__{d.rank}_"))
    total = sum(p.stat().st_size for p in shards.iterdir())
    d.barrier()
    plain = root / f"plain-{d.rank}"
    payload = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(plain, "wb") as fh:
        for _ in range(max(1, mine >> 20)):
            fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    d.barrier()
    plain_s = time.perf_counter() - start
    d.barrier()
    plain.unlink()
    if d.is_main:  # the shards stay for the export measurement (run_side removes them), with a config.json
        model.config.save_pretrained(shards)
    return {
        "save_stall_s": stall,
        "save_bytes": total,
        "plain_s": plain_s,
        "rank_bytes": mine,
        "root": str(root),
        **background,
    }


def export_worker(shards: Path) -> None:
    """A fresh process: the sharded checkpoint `shards` streamed into model.safetensors, its peak memory."""
    import torch.distributed.checkpoint  # noqa: F401  (imported before the measurement, as everything below)

    from tui_trainer.engine import safetensors_stream
    from tui_trainer.engine.models import meta_model

    def rss(field: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    safetensors_stream.saved_names(meta_model(shards))  # transformers' model classes imported
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the high-water mark starts again from here
    before = rss("VmRSS")
    out = shards / "model.safetensors"
    start = time.perf_counter()
    size = safetensors_stream.write_model_weights(shards, out)
    seconds = time.perf_counter() - start
    out.unlink()
    C.emit({"export_peak_bytes": rss("VmHWM") - before, "export_bytes": size, "export_s": seconds})


def measure_export(shards: str) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        return {}
    cmd = [C.PY, str(C.BENCH_DIR / "fsdp.py"), "--export-worker", shards]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith(C.RESULT_PREFIX):
            return C.json.loads(line[len(C.RESULT_PREFIX) :])
    raise RuntimeError(f"export worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def _background_saves(d, root: Path, model, optimizer, sharded_checkpoint) -> dict:
    """Two background saves in a row, as periodic saves make them: each one's stall on this rank (staging,
    starting DCP's async write: what the training thread waits for) and the time until it is written."""
    from tui_trainer.engine.async_shards import AsyncShardWriter

    writer = AsyncShardWriter(d)  # its gloo group: every rank
    out = {}
    for name, step in (("first", 1), ("next", 2)):
        d.barrier()
        start = time.perf_counter()
        directory = sharded_checkpoint.shards_dir(root, d, step)
        pending = writer.start(step, directory, sharded_checkpoint._state_dicts(model, optimizer))
        out[f"async_{name}_stall_s"] = time.perf_counter() - start
        pending.result()
        writer.wait()
        d.barrier()
        out[f"async_{name}_written_s"] = time.perf_counter() - start
        if d.is_main:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def run_side(side: str, steps: int, warmup: int) -> list[dict]:
    cmd = [C.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(C.BENCH_DIR / "fsdp.py"), "--worker", side, str(steps), str(warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, timeout=1800, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(C.RESULT_PREFIX):
            ranks = C.json.loads(line[len(C.RESULT_PREFIX) :])["ranks"]
            if side == "fsdp":
                import shutil

                try:
                    shards = next(Path(ranks[0]["root"]).iterdir())
                    ranks[0].update(measure_export(str(shards)))
                finally:
                    shutil.rmtree(ranks[0]["root"], ignore_errors=True)
            return ranks
    raise RuntimeError(f"{side} worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(ap)
    ap.add_argument("--sides", default="ddp,fsdp", help="which sides to run (RSS of one side alone)")
    ap.add_argument("--worker", nargs=3, metavar=("SIDE", "STEPS", "WARMUP"), help=argparse.SUPPRESS)
    ap.add_argument("--export-worker", metavar="SHARDS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_worker:
        export_worker(Path(args.export_worker))
        return
    if args.worker:
        side, steps, warmup = args.worker
        worker(side, int(steps), int(warmup))
        return
    C.apply_common(args)
    C.WORK.mkdir(parents=True, exist_ok=True)
    steps, warmup = (QUICK_STEPS, QUICK_WARMUP) if C.quick() else (STEPS, WARMUP)
    repeats = args.repeats or (1 if C.quick() else 3)
    load_before = C.load_avg()
    sides = [s for s in ("ddp", "fsdp") if s in args.sides.split(",")]
    got = C.interleave({s: lambda s=s: run_side(s, steps, warmup) for s in sides}, repeats)
    rss = {s: [max(r["peak_rss_mb"] for r in ranks) for ranks in got[s]] for s in got}
    tps = {s: [ranks[0]["tokens_per_s"] for ranks in got[s]] for s in got}
    what = "quick shape" if C.quick() else "GPT-2 124M shape"
    text = "\n".join(
        [
            f"Command: `{' '.join(['python benchmarks/fsdp.py', *sys.argv[1:]])}` — {what}, 2 CPU ranks (gloo), "
            f"{C.threads_note() if os.environ.get('OMP_NUM_THREADS') else 'OMP_NUM_THREADS=1 per rank'}; "
            f"{repeats} interleaved repeats, {steps} steps (tokens/s after {warmup}); load average before "
            f"{load_before}, after {C.load_avg()}.",
            "",
            C.table(
                ["side", "peak RSS per rank (MB, the larger rank)", "spread", "tokens/s", "spread"],
                [[s, C.median(rss[s]), C.spread(rss[s]), C.median(tps[s]), C.spread(tps[s])] for s in sides],
            ),
            "",
            *[_phase_table(side, got[side]) for side in sides],
            *(_comparison(got, rss, tps) if sides == ["ddp", "fsdp"] else []),
        ]
    )
    exports = [ranks[0] for ranks in got.get("fsdp", []) if "export_peak_bytes" in ranks[0]]
    if exports:
        ratio = [e["export_peak_bytes"] / e["export_bytes"] for e in exports]
        seconds = [e["export_s"] for e in exports]
        mb = exports[0]["export_bytes"] / 2**20
        text += (
            f"\n\nexport of the sharded checkpoint (streamed, fp32, {mb:.0f} MB model.safetensors): peak RSS above "
            f"the process's own {C.median(ratio):.3f} x the model's bytes (spread {C.spread(ratio)}), "
            f"{C.median(seconds):.2f} s ({mb / C.median(seconds):.0f} MB/s)."
        )
    C.publish("fsdp", text)


def _phase_table(side: str, repeats: list[list[dict]]) -> str:
    """RSS and peak RSS so far at each phase: the median over repeats of the larger rank."""
    names = [name for name, _, _ in repeats[0][0]["phases"]]
    rows = []
    for i, name in enumerate(names):
        now = [max(rank["phases"][i][1] for rank in ranks) for ranks in repeats]
        peak = [max(rank["phases"][i][2] for rank in ranks) for ranks in repeats]
        rows.append([name, C.median(now), C.median(peak)])
    return C.table([f"{side}: phase", "RSS per rank (MB)", "peak RSS so far (MB)"], rows) + "\n"


def _comparison(got: dict, rss: dict, tps: dict) -> list[str]:
    stall = [max(r["save_stall_s"] for r in ranks) for ranks in got["fsdp"]]
    background = {
        key: [max(r[key] for r in ranks) for ranks in got["fsdp"]]
        for key in ("async_first_stall_s", "async_next_stall_s", "async_first_written_s", "async_next_written_s")
    }
    plain = [max(r["plain_s"] for r in ranks) for ranks in got["fsdp"]]
    size = got["fsdp"][0][0]["save_bytes"]
    return [
        f"FSDP ÷ DDP: peak RSS {C.median(rss['fsdp']) / C.median(rss['ddp']):.2f}, tokens/s "
        f"{C.median(tps['fsdp']) / C.median(tps['ddp']):.2f}.",
        "",
        C.table(
            ["sharded save (every rank its shards, fsync, checksums, index)", "seconds (stall)", "MB/s"],
            [
                ["engine: write_shards", C.median(stall), size / 2**20 / C.median(stall)],
                ["plain write of the same bytes per rank + fsync", C.median(plain), size / 2**20 / C.median(plain)],
            ],
        ),
        f"({size / 2**20:.0f} MB in all; both rows: the slower rank, both ranks writing at once.)",
        "",
        C.table(
            ["background sharded save (periodic saves)", "stall (s)", "spread", "written after (s)", "spread"],
            [
                [
                    f"{which} save{note}",
                    C.median(background[f"async_{which}_stall_s"]),
                    C.spread(background[f"async_{which}_stall_s"]),
                    C.median(background[f"async_{which}_written_s"]),
                    C.spread(background[f"async_{which}_written_s"]),
                ]
                for which, note in (("first", " (staging buffers allocated)"), ("next", " (buffers reused)"))
            ],
        ),
        "(stall: staging every rank's shards and starting DCP's async write, the slower rank; training goes "
        "on meanwhile. Written after: until every rank's shards and DCP's index are on disk.)",
    ]


if __name__ == "__main__":
    main()

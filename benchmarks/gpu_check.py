"""GPU check: one command that proves every CUDA path of the engine, in under eight minutes (issue 26).

    python benchmarks/gpu_check.py            # on a CUDA machine; no arguments needed
    python benchmarks/gpu_check.py --dry-run  # every section on the CPU with tiny sizes (the suite runs this)

Prints one markdown report and writes it to $OUT/gpu_check.md when $OUT is set (or to --out), rewritten after
every section so a session cut short keeps what ran. Without CUDA (and without --dry-run) it prints "no CUDA
device: nothing to check" and exits 0. Exit status: 0 when every check held, 1 when one failed or a section
broke. Nothing is downloaded: models come from config, data from sample_data/ and the venv's own sources.

Each section runs in its own subprocess under its own time budget (SECTIONS; they add up to under eight
minutes): a crash, a hang or a poisoned CUDA context is reported in that section's place and the next section
runs. A section re-emits its whole result after every part, so one killed at its budget still reports the
parts it finished. The sections (BENCHMARKS.md, "GPU check", says what each number means):

1. environment: GPUs, memory, driver / CUDA / cuDNN / NCCL / torch versions, NVML, bf16 support;
2. correctness: fp32, bf16, fp16 (GradScaler) — pause at step k and resume gives the uninterrupted run's losses
   (torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG; otherwise the largest difference), and a NaN
   injected through the fault hooks (engine/faults.py Hooks) pauses the run, keeping the last good checkpoint;
3. device panel: the DeviceSample events of a run against torch.cuda.max_memory_allocated(), NVML fields;
4. speed: GPT-2 124M in bf16, engine tokens/s ÷ the bare loop (benchmarks/throughput.py), without and with
   torch.compile; MFU = 6·N·tokens/s ÷ the card's peak bf16 FLOP/s (PEAK_BF16_TFLOPS);
5. checkpoints at 124M: sync and async (pinned staging) save stalls, write MB/s ÷ a plain write of the same
   bytes, resume → first step ÷ fresh start → first step (benchmarks/checkpoint_124m.py's workers);
6. two GPUs: a 2-rank NCCL DDP run paused and resumed (torchrun, the real CLI) against an uninterrupted one;
7. FSDP2 (train.parallel=fsdp, bf16 mixed precision): a sharded run on every GPU (up to two) paused and resumed
   against an uninterrupted one, its sharded checkpoint verified, then continued on one rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

# The sections' deadline: eight minutes of a fifteen-minute GPU session, less ten seconds for this process's
# own start (importing torch) and the report.
TOTAL_BUDGET_S = 470.0
DRY_ENV = "GPU_CHECK_DRY"
# Test seam (tests/test_gpu_check.py): "SECTION:crash" or "SECTION:hang" makes that section's worker emit one
# part and then exit 3 or hang, so the test sees a broken section reported in its place and the rest run.
FAULT_ENV = "GPU_CHECK_FAULT"
NO_DEVICE = "no CUDA device: nothing to check"
KILL_GRACE_S = 3.0


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    budget_s: float  # its subprocess is killed after this; the budgets add up to < TOTAL_BUDGET_S

    @property
    def budget(self) -> float:
        return self.budget_s * budget_scale()


SECTIONS = (
    Section("env", "Environment", 20),
    Section("correctness", "Correctness: pause → resume in fp32 / bf16 / fp16, NaN pauses", 50),
    Section("device", "Device panel: DeviceSample events vs torch.cuda", 30),
    Section("speed", "Speed: GPT-2 124M in bf16, engine ÷ bare loop, MFU", 160),  # two torch.compile builds
    Section("checkpoints", "Checkpoints at GPT-2 124M", 80),
    Section("ddp", "Two GPUs: NCCL DDP pause → resume", 50),
    Section("fsdp", "FSDP2: sharded pause → resume, then on one rank", 55),
)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched against
# torch.cuda.get_device_name() by the longest key it contains. A card missing here gets no MFU, only tokens/s.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX A6000": 155.0,
}


def peak_bf16_flops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def dry() -> bool:
    return os.environ.get(DRY_ENV) == "1"


def budget_scale() -> float:
    """The dry run's budgets are three times the GPU's: it proves the script on a CPU that other work may
    share, and its times mean nothing (the eight-minute bound is the GPU run's)."""
    return 3.0 if dry() else 1.0


# ---------------------------------------------------------------- sizes: the GPU's, or the dry run's tiny ones


@dataclass(frozen=True)
class Sizes:
    small: dict[str, object]  # the correctness / device / DDP model
    steps: int  # correctness: the uninterrupted run's length
    pause_at: int  # correctness: where the interrupted run pauses
    every: int  # correctness: periodic checkpoints (so the NaN has a last good one to keep)
    nan_at: int  # correctness: the training forward from which the loss is NaN
    big: list[str]  # the GPT-2 124M shape for speed
    warmup: int  # speed: steps before the timed window (torch.compile compiles in the first)
    measure: int  # speed: timed steps
    device_samples: int  # device panel: DeviceSample events to collect


GPU_SIZES = Sizes(
    small={
        "model.n_layer": 2,
        "model.n_head": 4,
        "model.n_embd": 128,
        "model.block_size": 128,
        "train.batch_size": 16,
    },
    steps=24,
    pause_at=12,
    every=5,
    nan_at=8,
    # 12 x 768, 12 heads, vocab 50304 (checkpoint_124m.SHAPE), GPT-2's 1024 context, nanoGPT's dropout 0
    big=["model.block_size=1024", "train.batch_size=8", "model.dropout=0.0"],
    warmup=10,
    measure=40,
    device_samples=3,
)
DRY_SIZES = Sizes(
    small={
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "model.vocab_size": 300,
        "train.batch_size": 4,
    },
    steps=8,
    pause_at=4,
    every=3,
    nan_at=5,
    big=["model.block_size=32", "train.batch_size=2", "model.dropout=0.0"],
    warmup=2,
    measure=3,
    device_samples=2,
)


def sizes() -> Sizes:
    return DRY_SIZES if dry() else GPU_SIZES


def device_kind() -> str:
    return "cpu" if dry() else "cuda"


def small_corpus() -> Path:
    """tinyshakespeare (sample_data/); the dry run takes its first 100 KB, which tokenizes in a blink."""
    full = C.ROOT / "sample_data" / "tinyshakespeare.txt"
    if not dry():
        return full
    path = C.WORK / "gpu-check-small.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(full.read_bytes()[:100_000])
    return path


def small_overrides(**extra: object) -> list[str]:
    s = sizes()
    settings: dict[str, object] = {
        **s.small,
        "model.dropout": 0.1,  # on: the resumed dropout stream must be the uninterrupted one
        "train.max_steps": s.steps,
        "optim.warmup_steps": 2,
        "train.eval_every": s.every,
        "train.eval_batches": 2,
        "train.sample_every": 0,
        "train.device": device_kind(),
        "checkpoint.every_steps": s.every,
        "checkpoint.every_minutes": 0,
        "data.path": str(small_corpus()),
    }
    settings.update(extra)
    return [
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in settings.items()
    ]


def small_config(**extra: object) -> Any:
    from tui_trainer.core.config import Config

    return Config().with_overrides(small_overrides(**extra)).validate()


def fresh_store(name: str) -> Any:
    from tui_trainer.core.store import RunStore

    return RunStore(C.fresh_dir(f"gpu-check/{name}"))


def losses(store: Any, run: str, key: str = "loss") -> dict[int, float]:
    """step -> the last logged value (a step logged again after a restart supersedes the first)."""
    out: dict[int, float] = {}
    for record in C.read_jsonl(store.metrics_path(run)):
        if key in record and "step" in record:
            value = record[key]
            out[record["step"]] = float("nan") if value is None else float(value)
    return out


def max_difference(a: dict[int, float], b: dict[int, float]) -> float:
    if set(a) != set(b):
        return float("inf")
    diffs = [abs(a[s] - b[s]) for s in a if not (math.isnan(a[s]) and math.isnan(b[s]))]
    return max(diffs, default=0.0)


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


# ---------------------------------------------------------------- a section's result, emitted as it grows


class Out:
    """A section's markdown and its checks so far. Every change re-emits the whole result (one marked JSON
    line, _common.emit): the parent keeps the last one, so a section killed at its budget still reports
    what it finished."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.checks: list[tuple[str, bool | None, str]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.flush()

    def check(self, what: str, ok: bool | None, detail: str = "") -> None:
        """ok: True held, False failed (a finding), None not applicable here (said why in detail)."""
        self.checks.append((what, ok, detail))
        self.flush()

    def guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run one part; its exception becomes a failed check, and the section goes on with the next part."""
        try:
            fn()
        except Exception as exc:  # a part's failure is data: reported, never the end of the section
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.check(what, False, f"raised {type(exc).__name__}: {first}")

    def flush(self) -> None:
        C.emit({"md": "\n\n".join(self.parts), "checks": self.checks})


def verdict(ok: bool | None) -> str:
    return {True: "ok", False: "**FAILED**", None: "n/a"}[ok]


# ---------------------------------------------------------------- 1. environment


def section_env(out: Out) -> None:
    import platform

    import torch
    import transformers

    rows: list[list[Any]] = [
        ["torch", torch.__version__],
        ["CUDA (torch built with)", torch.version.cuda or "none"],
        ["transformers", transformers.__version__],
        ["python", platform.python_version()],
        ["CPU", f"{C.machine_info()['cpu']}, {os.cpu_count()} cores"],
    ]
    cuda = torch.cuda.is_available()
    if cuda:
        rows.append(["cuDNN", str(torch.backends.cudnn.version())])
        with contextlib.suppress(Exception):
            rows.append(["NCCL", ".".join(map(str, torch.cuda.nccl.version()))])
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                [
                    f"GPU {i}",
                    f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs",
                ]
            )
    else:
        rows.append(["GPU", "none (dry run on the CPU)" if dry() else "none"])
    nvml, driver = False, "n/a"
    try:
        import pynvml

        pynvml.nvmlInit()
        nvml = True
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    except Exception as exc:
        driver = f"n/a (NVML: {type(exc).__name__})"
    rows.append(["driver (NVML)", driver])
    out.add(C.table(["what", "value"], rows))
    if cuda:
        out.check("NVML present (the device panel's utilisation, temperature, power)", nvml, driver)
        out.check("bf16 supported", torch.cuda.is_bf16_supported())
        name = torch.cuda.get_device_name(0)
        peak = peak_bf16_flops(name)
        known = f"{peak / 1e12:,.0f} TFLOP/s dense bf16" if peak else "not in PEAK_BF16_TFLOPS: no MFU"
        out.check(f"peak bf16 of {name} known", True if peak else None, known)
    else:
        out.check("NVML present", None, "no GPU in a dry run")


# ---------------------------------------------------------------- 2. correctness


WARNED_OPS: set[str] = set()  # ops torch warned have no deterministic kernel, in this process so far


def nan_loss(output: Any) -> Any:
    output.loss = output.loss * float("nan")
    return output


def correctness_row(precision: str, out: Out) -> list[Any]:
    import warnings

    import torch

    from tui_trainer.core.errors import ConfigError
    from tui_trainer.core.events import FaultKind, State
    from tui_trainer.core.plan import plan_resume, plan_train
    from tui_trainer.engine.faults import Hooks
    from tui_trainer.engine.trainer import Trainer

    s = sizes()
    try:
        cfg = small_config(**{"train.precision": precision})
        store = fresh_store(f"correct-{precision}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whole = Trainer(store, plan_train(store, cfg, "whole"))
            whole_state = whole.run()
            first = Trainer(store, plan_train(store, cfg, "paused"), until_step=s.pause_at)
            first_state = first.run()
            resumed = Trainer(store, plan_resume(store, "paused"))
            resumed_state = resumed.run()
    except ConfigError as exc:  # fp16 on the CPU: the engine refuses it before anything is written
        out.check(f"{precision}: pause → resume", None, str(exc))
        return [precision, "refused on the CPU", "", "", "", ""]
    # torch warns once per process: an op found by an earlier precision's runs counts for this one too
    WARNED_OPS.update(str(w.message).splitlines()[0][:160] for w in caught if "determinis" in str(w.message).lower())
    nondeterministic = sorted(WARNED_OPS)
    a, b = losses(store, "whole"), losses(store, "paused")
    ea, eb = losses(store, "whole", "eval_loss"), losses(store, "paused", "eval_loss")
    ended = (whole_state, first_state, resumed_state) == (State.FINISHED, State.PAUSED, State.FINISHED)
    out.check(
        f"{precision}: runs end as asked",
        ended,
        f"uninterrupted {whole_state}, interrupted {first_state} at {first.step}, resumed {resumed_state}",
    )
    steps_ok = sorted(a) == list(range(1, s.steps + 1)) == sorted(b)
    out.check(f"{precision}: every step logged once", steps_ok, f"{len(a)} / {len(b)} steps")
    diff = max(max_difference(a, b), max_difference(ea, eb))
    exact = diff == 0.0
    if exact:
        ok: bool | None = True
        detail = "bit-exact"
    elif nondeterministic and diff < 1e-2:
        ok, detail = None, f"max |Δ| {diff:.3g}; ops without a deterministic kernel: {'; '.join(nondeterministic)}"
    else:
        ok, detail = False, f"max |Δ| {diff:.3g}" + (f" ({'; '.join(nondeterministic)})" if nondeterministic else "")
    out.check(f"{precision}: pause at {s.pause_at} → resume = uninterrupted (losses and eval losses)", ok, detail)

    # a NaN from the nan_at-th training forward on: the run pauses at that step, nothing diverged is saved
    nan_store = fresh_store(f"nan-{precision}")
    hooks = Hooks(after_forward=lambda n, output: nan_loss(output) if n >= s.nan_at else output)
    trainer = Trainer(nan_store, plan_train(nan_store, cfg, "nan"), hooks=hooks)
    state = trainer.run()
    failure = trainer.failure
    kept = [c.step for c in nan_store.run("nan").checkpoints]
    last_good = (s.nan_at - 1) // s.every * s.every
    nan_ok = (
        state == State.PAUSED
        and failure is not None
        and failure.kind == FaultKind.NAN
        and failure.step == s.nan_at
        and kept == [last_good]
        and nan_store.read_record("nan").get("status") == "paused"
    )
    said = failure.message if failure else f"no fault; ended {state}"
    out.check(f"{precision}: a NaN loss at step {s.nan_at} pauses, step {last_good} kept", nan_ok, said[:200])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [
        precision,
        f"{s.steps} steps, paused at {s.pause_at}",
        "yes" if exact else "no",
        f"{diff:.3g}",
        "; ".join(nondeterministic) or "none",
        f"paused at step {failure.step if failure else '?'}, checkpoints {kept}",
    ]


def section_correctness(out: Out) -> None:
    import torch

    # before any CUDA work: cuBLAS reads its workspace setting (set by the parent) at its first handle
    torch.use_deterministic_algorithms(True, warn_only=True)
    rows: list[list[Any]] = []
    header = ["precision", "runs", "resume bit-exact", "max |Δ loss|", "warned non-deterministic ops", "NaN injected"]

    def one(precision: str) -> None:
        rows.append(correctness_row(precision, out))
        out.parts = [C.table(header, rows)]
        out.flush()

    for precision in ("fp32", "bf16", "fp16"):
        out.guard(f"{precision}: correctness", lambda p=precision: one(p))
    cfg = small_config()
    out.add(
        f"Model {cfg.model.n_layer}×{cfg.model.n_embd}, block {cfg.model.block_size}, batch {cfg.train.batch_size}, "
        f"dropout {cfg.model.dropout}, checkpoints every {sizes().every} steps, "
        f"`torch.use_deterministic_algorithms(True, warn_only=True)`, "
        f"`CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', '')}`; "
        "all runs in one process (in-process Trainer, `plan_resume` for the resume)."
    )


# ---------------------------------------------------------------- 3. device panel


def section_device(out: Out) -> None:
    import psutil
    import torch

    from tui_trainer.core.events import DeviceSample
    from tui_trainer.core.plan import plan_train
    from tui_trainer.engine.trainer import Trainer

    want = sizes().device_samples
    cfg = small_config(
        **{
            "train.max_steps": 10**6,
            "train.eval_every": 0,
            "checkpoint.every_steps": 0,
            "train.batch_size": 2 * int(sizes().small["train.batch_size"]),  # type: ignore[call-overload]
        }
    )
    store = fresh_store("device")
    samples: list[DeviceSample] = []
    trainer = Trainer(store, plan_train(store, cfg, "device"))

    def sink(event: object) -> None:
        if isinstance(event, DeviceSample):
            samples.append(event)
            if len(samples) >= want:
                trainer.stop()

    trainer.sink = sink
    cuda = torch.cuda.is_available() and not dry()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    rows = [
        [
            i + 1,
            e.device,
            mb(e.allocated),
            mb(e.reserved),
            mb(e.peak),
            mb(e.total),
            "n/a" if e.utilization is None else f"{e.utilization:.0f}",
            "n/a" if e.temperature_c is None else f"{e.temperature_c:.0f}",
            "n/a" if e.power_w is None else f"{e.power_w:.0f}",
            mb(e.rss_bytes),
        ]
        for i, e in enumerate(samples)
    ]
    header = ["sample", "device", "allocated MB", "reserved MB", "peak MB", "total MB", "util %", "temp °C", "power W"]
    out.add(C.table([*header, "RSS MB"], rows))
    out.check(f"{want} DeviceSample events", len(samples) >= want, f"{len(samples)} in {trainer.step} steps")
    if not samples:
        return
    last = samples[-1]
    if not cuda:
        out.check("device is the CPU", last.device == "cpu", last.name)
        out.check("total is the machine's memory", last.total == psutil.virtual_memory().total, mb(last.total))
        out.check("GPU memory vs torch.cuda.max_memory_allocated()", None, "no GPU in a dry run")
        return
    props = torch.cuda.get_device_properties(0)
    out.check("device and name", (last.device, last.name) == ("cuda", props.name), f"{last.device}, {last.name}")
    out.check("total = the card's memory", last.total == props.total_memory, f"{mb(last.total)} MB")
    ordered = all(
        e.allocated is not None
        and e.reserved is not None
        and e.peak is not None
        and 0 < e.allocated <= e.reserved <= (e.total or 0)
        and e.allocated <= e.peak
        for e in samples
    )
    out.check("0 < allocated ≤ reserved ≤ total, allocated ≤ peak, in every sample", ordered)
    ratio = (last.peak or 0) / peak if peak else float("nan")
    out.check(
        "the last sample's peak = torch.cuda.max_memory_allocated() after the run",
        0.9 <= ratio <= 1.0,
        f"{mb(last.peak)} MB vs {mb(peak)} MB (× {ratio:.3f}); the peak is reached in the first step",
    )
    nvml = all(e.utilization is not None and e.temperature_c is not None and e.power_w is not None for e in samples)
    sane = nvml and all(
        0 <= (e.utilization or 0) <= 100 and 0 < (e.temperature_c or 0) < 120 and 0 < (e.power_w or 0) < 2000
        for e in samples
    )
    out.check("NVML utilisation / temperature / power in every sample, in range", sane, "; ".join(last.notes))


# ---------------------------------------------------------------- 4. speed


def big_config(extra: list[str]) -> Any:
    """GPT-2 124M on the corpus that reaches its vocabulary; the dry run: the correctness section's tiny model
    and corpus (its tokenizer is cached by then)."""
    from checkpoint_124m import corpus, shape

    if dry():
        tiny = [o for o in small_overrides() if o.split("=")[0].startswith(("model.", "data."))]
        return C.bench_config([*tiny, *sizes().big, "train.precision=bf16", "train.device='cpu'", *extra])
    return C.bench_config([*shape(), *sizes().big, "train.precision=bf16", "train.device='cuda'", *corpus(), *extra])


def engine_speed(cfg: Any, warmup: int, measure: int) -> dict:
    from throughput import tokens_per_step

    from tui_trainer.core.events import StepLogged
    from tui_trainer.core.plan import plan_train
    from tui_trainer.engine.trainer import Trainer

    store = fresh_store("speed-engine")
    trainer = Trainer(store, plan_train(store, cfg, "speed"))

    def sink(event: object) -> None:
        if isinstance(event, StepLogged) and event.step >= warmup + measure:
            trainer.stop()  # no pause: its checkpoint would be 1.5 GB of writing nobody times

    trainer.sink = sink
    trainer.run()
    if trainer.failure is not None:
        raise RuntimeError(trainer.failure.message)
    result = C.steady_tokens_per_s(C.read_jsonl(store.metrics_path("speed")), warmup, tokens_per_step(cfg))
    result["params"] = sum(p.numel() for p in trainer.parts.model.parameters())
    return result


def bare_speed(cfg: Any, warmup: int, measure: int, compiled: bool) -> dict:
    from throughput import bare_loop, build_reference

    parts = build_reference(cfg, "bf16", device_kind())
    result = bare_loop(cfg, warmup, measure, "bf16", parts=parts, compile_model=compiled)
    result["params"] = sum(p.numel() for p in parts[1].parameters())
    return result


def section_speed(out: Out) -> None:
    import functools
    import gc

    import torch

    if dry():  # the dry run proves the plumbing: dynamo traces, inductor's C++ build is skipped
        torch.compile = functools.partial(torch.compile, backend="eager")  # type: ignore[assignment]
    s = sizes()
    peak = peak_bf16_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() and not dry() else None
    rows: list[list[Any]] = []
    got: dict[tuple[str, bool], dict] = {}
    header = ["side", "torch.compile", "tokens/s", "× bare loop", "MFU", "params", "wall s"]

    def side(kind: str, compiled: bool) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        t0 = time.perf_counter()
        cfg = big_config([f"train.compile={str(compiled).lower()}"])
        if kind == "engine":
            r = engine_speed(cfg, s.warmup, s.measure)
        else:
            r = bare_speed(cfg, s.warmup, s.measure, compiled)
        got[(kind, compiled)] = r
        bare = got.get(("bare loop", compiled))
        ratio = r["tokens_per_s"] / bare["tokens_per_s"] if bare else float("nan")
        mfu = 6 * r["params"] * r["tokens_per_s"] / peak if peak else None
        rows.append(
            [
                kind,
                "on" if compiled else "off",
                r["tokens_per_s"],
                "reference" if kind == "bare loop" else f"{ratio:.3f}",
                "n/a" if mfu is None else f"{mfu:.1%}",
                f"{r['params']:,}",
                f"{time.perf_counter() - t0:.0f}",
            ]
        )
        out.parts = [C.table(header, rows)]
        out.flush()
        if kind == "engine":
            out.check(f"engine ÷ bare loop, compile {'on' if compiled else 'off'}", True, f"{ratio:.3f}")

    for compiled in (False, True):
        for kind in ("bare loop", "engine"):
            out.guard(f"{kind}, compile {'on' if compiled else 'off'}", lambda k=kind, c=compiled: side(k, c))
    cfg = big_config([])
    tokens = cfg.train.batch_size * cfg.model.block_size
    note = (
        f"Shape {cfg.model.n_layer}×{cfg.model.n_embd}, {cfg.model.n_head} heads, vocab {cfg.model.vocab_size}, "
        f"block {cfg.model.block_size}, batch {cfg.train.batch_size} ({tokens:,} tokens a step), bf16 autocast, "
        f"fused AdamW, dropout {cfg.model.dropout}; {s.warmup} warmup + {s.measure} timed steps per side, one "
        "process, sides in order. Engine: in-process Trainer, log_every 1 (a host sync each step, the default), "
        "tokens/s from its metrics.jsonl; bare loop: benchmarks/throughput.py, one sync at the end. "
        "MFU = 6 · params · tokens/s ÷ peak bf16 "
        + (f"({peak / 1e12:,.0f} TFLOP/s)" if peak else "(card not in PEAK_BF16_TFLOPS, or no GPU: n/a)")
        + ", attention FLOPs left out."
    )
    if dry():
        note += " Dry run: torch.compile with backend='eager' (no inductor build)."
    out.add(note)


# ---------------------------------------------------------------- 5. checkpoints


def filesystem(path: Path) -> str:
    """The mount `path` is on (a tmpfs /tmp measures memory, not a disk)."""
    import psutil

    resolved = str(path.resolve())
    mounts = [m for m in psutil.disk_partitions(all=True) if resolved.startswith(m.mountpoint)]
    if not mounts:
        return "filesystem unknown"
    m = max(mounts, key=lambda m: len(m.mountpoint))
    return f"{m.fstype} on {m.device}, mounted at {m.mountpoint}"


def section_checkpoints(out: Out) -> None:
    import checkpoint_124m as K

    threads = 1 if dry() else min(8, os.cpu_count() or 1)
    bf16 = ["train.precision=bf16", f"train.device='{device_kind()}'"]
    res: dict[str, dict] = {}
    table_rows: list[list[Any]] = []

    def show() -> None:
        out.parts = [C.table(["what", "seconds", "MB/s", "÷ plain write", "notes"], table_rows)]
        out.flush()

    def writes() -> None:
        where = C.fresh_dir("gpu-check/ck-writes")
        w = K.writes_worker(where)
        shutil.rmtree(where, ignore_errors=True)  # six checkpoints' worth of disk
        res["writes"] = w
        size = w["bytes"]
        table_rows.append(["checkpoint size", "", "", "", f"{size / 1e9:.2f} GB (weights + AdamW state)"])
        table_rows.append(
            ["plain: save_file + torch.save + fsync", w["plain_s"], size / w["plain_s"] / 1e6, "1.00", ""]
        )
        table_rows.append(
            [
                "ours: checkpoint_save.write (sync)",
                w["ours_s"],
                size / w["ours_s"] / 1e6,
                f"{w['plain_s'] / w['ours_s']:.2f}",
                "CPU tensors",
            ]
        )
        show()

    def plain_mbps() -> float | None:
        w = res.get("writes")
        return w["bytes"] / w["plain_s"] / 1e6 if w else None

    def engine(kind: str) -> None:
        sync = kind == "sync"
        runs = C.fresh_dir(f"gpu-check/ck-{kind}")
        extra = [*bf16, *(["checkpoint.async_save=false"] if sync else [])]
        r = K.train_worker(runs, threads, True, extra=extra)
        res[kind] = r
        stalls = r["stalls_s"]
        plain = plain_mbps()
        if sync:
            stall = C.median(stalls)
            mbps = r["bytes"] / stall / 1e6
            notes = f"median of {len(stalls)} saves; the stall is the whole write"
        else:
            stall = stalls[0] if stalls else float("nan")
            mbps = r["bytes"] / r["write_s"] / 1e6 if r["write_s"] else float("nan")
            later = ", ".join(f"{x:.2f}" for x in stalls[1:])
            notes = f"first save (no earlier write in flight); later: {later} s; MB/s of the background write"
        if r["notices"]:
            notes += "; notices: " + " | ".join(r["notices"])
        ratio = f"{mbps / plain:.2f}" if plain else "n/a"
        table_rows.append([f"engine, {kind} save stall", stall, mbps, ratio, notes])
        show()
        out.check(f"{kind} saves written ({r['saves']})", r["saves"] == K.SAVES, f"stall {stall:.2f} s")

    def resume() -> None:
        r = K.resume_worker(C.WORK / "gpu-check" / "ck-async", threads)
        fresh = res["async"]["start_to_first_step_s"]
        back = r["resume_to_first_step_s"]
        table_rows.append(["fresh start → first step", fresh, "", "", "plan + setup + one step, torch imported"])
        table_rows.append(["resume → first step", back, "", f"{back / fresh:.2f} × fresh", "verify + load + one step"])
        show()
        out.check("resume → first step ÷ fresh start", True, f"{back / fresh:.2f}")

    if not dry():
        import torch

        torch.zeros(1, device="cuda")  # the CUDA context first: neither start below pays for it
    out.guard("writes: ours vs plain", writes)
    out.guard("sync saves", lambda: engine("sync"))
    out.guard("async saves", lambda: engine("async"))
    out.guard("resume", resume)
    for kind in ("sync", "async"):  # a few GB of 124M checkpoints nobody reads again
        shutil.rmtree(C.WORK / "gpu-check" / f"ck-{kind}", ignore_errors=True)
    what = "quick shape (dry run)" if C.quick() else "GPT-2 124M"
    out.add(
        f"Written under {C.WORK} ({filesystem(C.WORK)}). "
        f"{what}, bf16 autocast, batch 1 × block 64, {K.EVERY * K.SAVES + K.TAIL} steps saving every {K.EVERY} "
        f"(benchmarks/checkpoint_124m.py's workers, {threads} torch threads). Async stages into page-locked "
        "shared memory on CUDA (engine/staging.py) and writes in a writer process; its later saves come faster "
        "than a write ends, so they include waiting for the previous one."
    )


# ---------------------------------------------------------------- 6. two GPUs


LAUNCHER = """import sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
from tui_trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(args: list[str], timeout: float, ranks: int = 2) -> tuple[int, str]:
    launcher = C.WORK / "gpu-check" / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [C.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), str(launcher), "--"]
    cmd += args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=C.WORK / "gpu-check")
    except subprocess.TimeoutExpired as exc:  # its workers are reaped with the section's process group
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        return -1, f"{err}\ntimed out after {timeout:.0f} s"
    return proc.returncode, proc.stderr


def budget_of(key: str) -> float:
    """A section's own budget: the parent kills it then; a job inside it is given what is left of it."""
    return next(section.budget for section in SECTIONS if section.key == key)


def run_jobs(out: Out, jobs: list[tuple[str, int, list[str]]], backend: str, deadline: float) -> list[list[Any]] | None:
    """Each (label, ranks, CLI args) as a torchrun job, in order, into the section's table; None (and a failed
    check with the job's stderr) at the first job that does not exit 0."""
    rows: list[list[Any]] = []
    for label, ranks, args in jobs:
        t0 = time.perf_counter()
        rc, err = torchrun(args, max(1.0, deadline - time.monotonic()), ranks=ranks)
        # the CLI names its world: "2 ranks (nccl)", or "2 ranks (FSDP, nccl)"
        rows.append([label, ranks, rc, f"{time.perf_counter() - t0:.1f}", f"{backend})" in err])
        out.parts = [C.table(["job", "ranks", "exit", "seconds", f"'{backend}' named"], rows)]
        out.flush()
        if rc != 0:
            out.add("```\n" + err[-2000:] + "\n```")
            out.check(f"{label} job exits 0", False, f"exit {rc}")
            return None
    return rows


def section_ddp(out: Out) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dry() and gpus < 2:
        out.add(f"{gpus} GPU(s): the 2-rank NCCL check needs two; skipped.")
        out.check("2-rank NCCL DDP pause → resume", None, f"{gpus} GPU")
        return
    s = sizes()
    backend = "gloo" if dry() else "nccl"
    runs = C.fresh_dir("gpu-check/ddp") / "runs"
    sets = [a for o in small_overrides(**{"train.grad_accum": 2}) for a in ("--set", o)]
    common = ["--headless", "--runs-dir", str(runs)]
    # the parent kills the section at its budget anyway; this only turns a hung job into a clear line
    deadline = time.monotonic() + budget_of("ddp") - 5
    jobs = [
        ("uninterrupted", 2, ["train", "--name", "u", *common, *sets]),
        (f"paused at {s.pause_at}", 2, ["train", "--name", "p", *common, *sets, "--until-step", str(s.pause_at)]),
        ("resumed", 2, ["resume", "p", *common]),
    ]
    rows = run_jobs(out, jobs, backend, deadline)
    if rows is None:
        return
    from tui_trainer.core.store import RunStore

    store = RunStore(runs)
    a, b = losses(store, "u"), losses(store, "p")
    diff = max_difference(a, b)
    record = store.read_record("p")
    out.check(
        f"2 ranks on {backend}",
        all(r[4] for r in rows) and record.get("world_size") == 2,
        str(record.get("world_size")),
    )
    # gloo on the CPU is bit-exact (tests/test_ddp.py); NCCL's reductions may not be: the difference is the finding
    exact = diff == 0.0
    ok = True if exact else (None if not dry() and diff < 1e-2 else False)
    out.check(
        f"2-rank pause at {s.pause_at} → resume = uninterrupted",
        ok,
        f"max |Δ| {diff:.3g} over {len(a)} steps" + ("" if exact else " (not bit-exact)"),
    )


# ---------------------------------------------------------------- 7. FSDP2


def section_fsdp(out: Out) -> None:
    """The sharded path on CUDA: fully_shard per block with bf16 mixed precision, DCP checkpoints written by
    every rank, pause → resume at the same world size, `verify` of the sharded checkpoint, and its newest
    checkpoint read back by one rank (DCP reshards) and trained on."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = 2 if dry() else min(gpus, 2)
    if ranks < 1:
        out.check("FSDP pause → resume", None, "no GPU")
        return
    s = sizes()
    backend = "gloo" if dry() else "nccl"
    precision = "fp32" if dry() else "bf16"
    runs = C.fresh_dir("gpu-check/fsdp") / "runs"
    fsdp = {"train.parallel": "fsdp", "train.precision": precision, "train.grad_accum": 2}
    sets = [a for o in small_overrides(**fsdp) for a in ("--set", o)]
    common = ["--headless", "--runs-dir", str(runs)]
    deadline = time.monotonic() + budget_of("fsdp") - 5
    jobs = [
        ("uninterrupted", ranks, ["train", "--name", "u", *common, *sets]),
        (f"paused at {s.pause_at}", ranks, ["train", "--name", "p", *common, *sets, "--until-step", str(s.pause_at)]),
        ("resumed", ranks, ["resume", "p", *common]),
    ]
    rows = run_jobs(out, jobs, backend, deadline)
    if rows is None:
        return
    out.check(f"FSDP on {ranks} rank(s), {backend}", all(r[4] for r in rows), "named by every job")
    from tui_trainer.core.store import RunStore

    store = RunStore(runs)
    diff = max_difference(losses(store, "u"), losses(store, "p"))
    exact = diff == 0.0
    # bit-exact on the CPU (tests/test_fsdp.py); NCCL's reductions and bf16 may not be: the difference is data
    ok = True if exact else (None if not dry() and diff < 5e-2 else False)
    out.check(
        f"FSDP on {ranks} rank(s), {backend}, {precision}: pause → resume = uninterrupted", ok, f"max |Δ| {diff:.3g}"
    )
    newest = sorted(store.run_dir("p").glob("checkpoints/step-*"))[-1]
    shards = len(list(newest.glob("*.distcp")))
    verify = subprocess.run([C.TUI, "verify", "p", "--runs-dir", str(runs)], capture_output=True, timeout=120)
    out.check("the sharded checkpoints verify", verify.returncode == 0 and shards == ranks, f"{shards} shard files")
    # the newest checkpoint, written by `ranks` ranks, read back by one (DCP reshards) and trained 2 steps on
    one = ["branch", "p", "--name", "one", *common, "--set", f"train.max_steps={s.steps + 2}"]
    rc, err = torchrun(one, max(1.0, deadline - time.monotonic()), ranks=1)
    out.check(f"its {ranks}-rank checkpoint trains on one rank", rc == 0, err.strip()[-300:] if rc else "")


SECTION_FUNCS: dict[str, Callable[[Out], None]] = {
    "env": section_env,
    "correctness": section_correctness,
    "device": section_device,
    "speed": section_speed,
    "checkpoints": section_checkpoints,
    "ddp": section_ddp,
    "fsdp": section_fsdp,
}


def run_worker(key: str) -> None:
    out = Out()
    out.flush()  # an empty result at once: a section killed before its first part still parses
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith(f"{key}:"):
        out.add(f"(fault injected: {fault})")
        if fault.endswith(":crash"):
            os._exit(3)
        time.sleep(10**6)
    SECTION_FUNCS[key](out)


# ---------------------------------------------------------------- the parent: sections in subprocesses


@dataclass
class Done:
    section: Section
    seconds: float
    result: dict | None  # the worker's last emitted result
    rc: int | None
    timed_out: bool
    stderr: str

    @property
    def status(self) -> str:
        checks = (self.result or {}).get("checks", [])
        if self.timed_out:
            return f"**TIMED OUT** after {self.seconds:.0f} s"
        if self.rc is None:
            return "skipped: out of time"
        if self.rc != 0 or self.result is None:
            return f"**BROKE** (exit {self.rc})"
        if any(ok is False for _, ok, _ in checks):
            return "**FAILED**"
        return "ok"


def kill_group(proc: subprocess.Popen) -> None:
    """The section's whole process group (its writer processes, torchrun's workers), TERM then KILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace or None)


def run_section(section: Section, timeout: float) -> Done:
    logs = C.WORK / "gpu-check-logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{section.key}.out", logs / f"{section.key}.err"
    t0 = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [C.PY, __file__, "--worker", section.key], stdout=out, stderr=err, cwd=C.ROOT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.returncode
        else:  # the worker is gone; anything it left behind in its group goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    result = None
    for line in reversed(out_path.read_text(errors="replace").splitlines()):
        if line.startswith(C.RESULT_PREFIX):
            result = json.loads(line[len(C.RESULT_PREFIX) :])
            break
    return Done(section, time.monotonic() - t0, result, rc, timed_out, err_path.read_text(errors="replace"))


def render(done: list[Done], started: str, total_s: float, pending: list[Section]) -> str:
    mode = "dry run on the CPU (tiny sizes: proves the script, not a GPU)" if dry() else "CUDA"
    lines = [
        f"# GPU check — {started}",
        "",
        f"Mode: {mode}. Total {total_s:.0f} s of a {TOTAL_BUDGET_S * budget_scale():.0f} s budget.",
        "",
    ]
    summary = [
        [i + 1, d.section.title, d.status, f"{d.seconds:.0f} / {d.section.budget:.0f}"] for i, d in enumerate(done)
    ]
    summary += [[len(done) + i + 1, s.title, "not run yet", f"— / {s.budget:.0f}"] for i, s in enumerate(pending)]
    lines += [C.table(["#", "section", "result", "seconds / budget"], summary), ""]
    for i, d in enumerate(done):
        lines += [
            f"## {i + 1}. {d.section.title}",
            "",
            f"Result: {d.status} ({d.seconds:.0f} s of {d.section.budget:.0f} s).",
            "",
        ]
        body = (d.result or {}).get("md", "")
        if body:
            lines += [body, ""]
        checks = (d.result or {}).get("checks", [])
        if checks:
            lines += [f"- {verdict(ok)}: {what}" + (f" — {detail}" if detail else "") for what, ok, detail in checks]
            lines.append("")
        if d.timed_out or d.rc not in (0, None) or d.result is None:
            tail = d.stderr.strip()[-2500:] or "(no stderr)"
            lines += ["stderr (tail):", "", "```", tail, "```", ""]
    return "\n".join(lines)


def report_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.md" if out else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        run_worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny sizes")
    ap.add_argument("--out", help="report file (default: $OUT/gpu_check.md when $OUT is set)")
    keys = [s.key for s in SECTIONS]
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(keys)}")
    ap.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="another time budget for one section (repeatable), e.g. speed=300 on a slow card",
    )
    args = ap.parse_args(argv)
    only = [k.strip() for k in (args.only or ",".join(keys)).split(",") if k.strip()]
    unknown = sorted(set(only) - set(keys))
    if unknown or not only:
        ap.error(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(keys)}")
    budgets: dict[str, float] = {}
    for item in args.budget:
        key, _, seconds = item.partition("=")
        try:
            budgets[key] = float(seconds)
        except ValueError:
            ap.error(f"--budget: {item!r} is not SECTION=SECONDS")
        if key not in keys or budgets[key] <= 0:
            ap.error(f"--budget: {item!r}: the section must be one of {', '.join(keys)}, the seconds positive")
    path = report_path(args.out)
    # every worker inherits these: nothing is downloaded, cuBLAS can be deterministic, the dry run is tiny
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dry_run:
        os.environ[DRY_ENV] = "1"
        C.set_quick(True)  # checkpoint_124m's quick shape and corpus
    else:
        os.environ.pop(DRY_ENV, None)
        import torch  # the parent never touches the device: is_available() creates no context

        if not torch.cuda.is_available():
            print(NO_DEVICE)
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(NO_DEVICE + "\n")
            return 0
    chosen = [
        dataclasses.replace(s, budget_s=budgets[s.key] / budget_scale()) if s.key in budgets else s
        for s in SECTIONS
        if s.key in only
    ]
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    done: list[Done] = []
    for i, section in enumerate(chosen):
        left = TOTAL_BUDGET_S * budget_scale() - KILL_GRACE_S - (time.monotonic() - t0)
        if left < 10:
            done.append(Done(section, 0.0, None, None, False, ""))
        else:
            print(
                f"[{i + 1}/{len(chosen)}] {section.title} (budget {section.budget:.0f} s) …",
                file=sys.stderr,
                flush=True,
            )
            done.append(run_section(section, min(section.budget, left)))
            print(f"      {done[-1].status} in {done[-1].seconds:.0f} s", file=sys.stderr, flush=True)
        text = render(done, started, time.monotonic() - t0, chosen[i + 1 :])
        if path:  # after every section: a session cut short keeps what ran
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
    print(text)
    return 0 if all(d.status == "ok" for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/gpu_check.py proves itself on the CPU, so it is ready the moment a GPU is lent (issue 26).

`--dry-run` runs every section, each in its own subprocess, with tiny sizes; a section that breaks or hangs
is reported in its place and the next one still runs; without CUDA (and without --dry-run) there is nothing
to check and it exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def check(tmp_path: Path, *args: str, timeout: float = 900, fault: str = "") -> tuple[subprocess.CompletedProcess, str]:
    """Run the script with its work dir and $OUT under tmp_path (and `fault` injected: gpu_check.FAULT_ENV);
    returns the process and $OUT/gpu_check.md."""
    out = tmp_path / "out"
    environ = {**os.environ, "BENCH_WORK": str(tmp_path / "work"), "OUT": str(out), gpu_check.FAULT_ENV: fault}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    report = out / "gpu_check.md"
    return done, report.read_text() if report.exists() else ""


# The FSDP section is four torchrun jobs (about a minute on 2 cores): the suite's FSDP tests run those
# commands already (tests/test_fsdp.py), and its dry run is recorded in BENCHMARKS.md ("GPU check").
SUITE_SECTIONS = [s for s in gpu_check.SECTIONS if s.key != "fsdp"]


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu_and_reports_each(tmp_path):
    done, report = check(tmp_path, "--dry-run", "--only", ",".join(s.key for s in SUITE_SECTIONS))
    assert done.returncode == 0, report or done.stderr[-3000:]
    assert done.stdout.strip() == report.strip()  # the report printed is the report written
    for i, section in enumerate(SUITE_SECTIONS, 1):
        assert f"## {i}. {section.title}\n\nResult: ok (" in report, section.key
    for line in (
        "ok: fp32: pause at 4 → resume = uninterrupted (losses and eval losses) — bit-exact",
        "ok: bf16: pause at 4 → resume = uninterrupted (losses and eval losses) — bit-exact",
        "n/a: fp16: pause → resume — train.precision=fp16 needs a GPU",
        "ok: fp32: a NaN loss at step 5 pauses, step 3 kept",
        "ok: bf16: a NaN loss at step 5 pauses, step 3 kept",
        "ok: 2 DeviceSample events",
        "ok: engine ÷ bare loop, compile off",
        "ok: engine ÷ bare loop, compile on",
        "ok: sync saves written (3)",
        "ok: async saves written (3)",
        "ok: resume → first step ÷ fresh start",
        "ok: 2 ranks on gloo",
        "ok: 2-rank pause at 4 → resume = uninterrupted — max |Δ| 0 over 8 steps",
    ):
        assert line in report, line
    assert "FAILED" not in report and "BROKE" not in report and "TIMED OUT" not in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: there is something to check")
def test_without_cuda_there_is_nothing_to_check_and_it_exits_0(tmp_path):
    done, report = check(tmp_path, timeout=120)
    assert (done.returncode, done.stdout) == (0, "no CUDA device: nothing to check\n"), done.stderr
    assert report == "no CUDA device: nothing to check\n"


def test_a_hung_section_is_killed_at_its_budget_reported_in_its_place_and_the_next_one_runs(tmp_path):
    start = time.monotonic()
    done, report = check(tmp_path, "--dry-run", "--only", "env,device", "--budget", "env=4", fault="env:hang")
    assert done.returncode == 1
    assert time.monotonic() - start < 120
    assert "## 1. Environment\n\nResult: **TIMED OUT** after" in report, report
    assert "(fault injected: env:hang)" in report  # what the section emitted before it hung is kept
    assert "## 2. Device panel: DeviceSample events vs torch.cuda\n\nResult: ok (" in report, report
    # the hung worker is gone with its process group
    assert not [p.pid for p in psutil.process_iter() if work_of(p) == str(tmp_path / "work")]


def work_of(process: psutil.Process) -> str | None:
    """The BENCH_WORK of one of this script's section workers, else None."""
    try:
        if "--worker" in process.cmdline() and str(SCRIPT) in process.cmdline():
            return process.environ().get("BENCH_WORK")
    except psutil.Error:
        pass
    return None


def test_a_crashed_section_says_how_it_ended(tmp_path):
    done, report = check(tmp_path, "--dry-run", "--only", "env", fault="env:crash", timeout=120)
    assert done.returncode == 1
    assert "Result: **BROKE** (exit 3)" in report and "(fault injected: env:crash)" in report, report


def test_the_budgets_add_up_to_eight_minutes_at_most():
    grace = gpu_check.KILL_GRACE_S * len(gpu_check.SECTIONS)
    assert sum(s.budget_s for s in gpu_check.SECTIONS) + grace <= gpu_check.TOTAL_BUDGET_S <= 8 * 60 - 10


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A10", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("Tesla T4", None),
    ],
)
def test_mfu_takes_the_peak_of_the_longest_matching_card_name(name, tflops):
    peak = gpu_check.peak_bf16_flops(name)
    assert (peak / 1e12 if peak else None) == tflops


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    done, _ = check(tmp_path, "--dry-run", "--only", "env,gpus", timeout=60)
    assert done.returncode == 2 and "--only: unknown section(s) gpus" in done.stderr
    done, _ = check(tmp_path, "--dry-run", "--budget", "speed=fast", timeout=60)
    assert done.returncode == 2 and "--budget: 'speed=fast' is not SECTION=SECONDS" in done.stderr

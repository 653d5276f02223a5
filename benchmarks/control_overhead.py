"""Control channel overhead: throughput of a real headless run (`tui-trainer train --headless`, which
always serves its control socket) while clients use the socket.

Sides, each a fresh CLI process on the benchmark workload, measured over the same window after warmup:
- unwatched: nobody connects during the window
- hostile:   every second 50 clients connect and drop (half read part of the hello first), and one client
             stays connected and never reads
- reader:    one client reads every event as it comes
- attached:  `tui-trainer attach` (the app) open on the run in a tmux pane, showing it live (`--attached`
             adds this side; it needs tmux)

Throughput is tokens / wall time over the window (tokens interpolated from metrics.jsonl at its ends), so it
counts everything the process does (the server thread included); the clients run in this process, on the
same cores. On a shared machine wall throughput swings with the neighbours' load, so the script also
reports tokens per CPU-second of the training process (/proc/<pid>/stat utime+stime, every thread): the
server's own cost shows there whatever the load. Sides are interleaved (rotating order) and reported as
medians; the ratios are against unwatched.
Run: python benchmarks/control_overhead.py [--quick] [--repeats N] [--threads N] [--window S]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.protocol import connect, find_socket

RUN = "bench"


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def hostile(run_dir: Path, stop: threading.Event) -> None:
    path = find_socket(run_dir)
    assert path is not None
    idle = connect(path)  # connected all along, never reads
    while not stop.is_set():
        started = time.monotonic()
        for i in range(50):
            with contextlib.suppress(OSError):
                sock = connect(path)
                if sock is not None:
                    if i % 2:
                        sock.recv(64)
                    sock.close()
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
    if idle is not None:
        idle.close()


def reader(run_dir: Path, stop: threading.Event) -> None:
    client = ControlClient.open(run_dir)
    assert client is not None
    with client, contextlib.suppress(ChannelClosed):
        while not stop.is_set():
            client.next_event(30)


APP_READY = threading.Event()  # the attached app shows the run: the window starts


def attached_app(run_dir: Path, stop: threading.Event) -> None:
    """The app attached to the run in a real terminal for the whole window."""
    APP_READY.clear()
    pane = C.pane([C.TUI, "attach", run_dir.name, "--runs-dir", str(run_dir.parent)])
    try:
        pane.wait_for(r"Running", timeout=120)
        APP_READY.set()
        stop.wait()
        pane.send("q")  # detach: the run goes on until the benchmark pauses it
        pane.wait_for(r"EXIT=0", timeout=30)
    finally:
        pane.close()


LOADS: dict[str, Callable[[Path, threading.Event], None] | None] = {
    "unwatched": None,
    "hostile": hostile,
    "reader": reader,
    "attached": attached_app,
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tokens_at(lines: list[dict[str, Any]], t: float) -> float:
    """Tokens trained by time t, interpolated between the logged steps around it."""
    before = max((r for r in lines if r["time"] <= t), key=lambda r: r["time"])
    after = min((r for r in lines if r["time"] >= t), key=lambda r: r["time"])
    if after["time"] == before["time"]:
        return float(before["tokens"])
    share = (t - before["time"]) / (after["time"] - before["time"])
    return before["tokens"] + share * (after["tokens"] - before["tokens"])


def one(side: str, window: float, warmup: int) -> dict[str, float]:
    runs = C.fresh_dir(f"control-{side}")
    run_dir = runs / RUN
    metrics = run_dir / "metrics.jsonl"
    cmd = [C.TUI, "train", "--headless", "--run", RUN, "--runs-dir", str(runs), *C.set_args()]
    proc = subprocess.Popen(cmd, cwd=C.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: find_socket(run_dir) is not None, 300, "the control socket")
        wait_until(lambda: any(r.get("step", 0) >= warmup for r in C.read_jsonl(metrics)), 300, "warmup")
        stop = threading.Event()
        load = LOADS[side]
        thread = threading.Thread(target=load, args=(run_dir, stop), daemon=True) if load else None
        start, cpu_start = time.time(), cpu_seconds(proc.pid)
        if thread:
            thread.start()
            if side == "attached":  # measure the app showing the run, not the app starting
                wait_until(APP_READY.is_set, 120, "the attached app")
                start, cpu_start = time.time(), cpu_seconds(proc.pid)
        time.sleep(window)
        end, cpu_end = time.time(), cpu_seconds(proc.pid)
        stop.set()
        if thread:
            thread.join(60)
        with ControlClient.open(run_dir) or contextlib.nullcontext() as client:
            if client is not None:
                client.request("pause")
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [r for r in C.read_jsonl(metrics) if "loss" in r]
    if not lines or lines[-1]["time"] < end or lines[0]["time"] > start:
        raise RuntimeError(f"{side}: the logged steps do not cover the window")
    tokens = tokens_at(lines, end) - tokens_at(lines, start)
    return {"tokens_per_s": tokens / (end - start), "tokens_per_cpu_s": tokens / (cpu_end - cpu_start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.common_args(ap)
    ap.add_argument("--window", type=float, default=None, help="seconds measured per side (default 20)")
    ap.add_argument("--attached", action="store_true", help="only unwatched vs the app attached (tmux)")
    args = ap.parse_args()
    C.apply_common(args)
    window = args.window or (5.0 if C.quick() else 20.0)
    repeats = args.repeats or (1 if C.quick() else 3)
    warmup = 5 if C.quick() else 20
    load_before = C.load_avg()
    sides = ("unwatched", "attached") if args.attached else ("unwatched", "hostile", "reader")
    results = C.interleave({side: (lambda s=side: one(s, window, warmup)) for side in sides}, repeats)
    base = C.median([r["tokens_per_s"] for r in results["unwatched"]])
    base_cpu = C.median([r["tokens_per_cpu_s"] for r in results["unwatched"]])
    rows = []
    for side, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        cpu = [r["tokens_per_cpu_s"] for r in runs]
        rows.append(
            [
                side,
                C.median(tps),
                C.spread(tps),
                C.median(tps) / base,
                C.median(cpu),
                C.spread(cpu),
                C.median(cpu) / base_cpu,
            ]
        )
    headers = ["side", "tokens/s", "range", "ratio", "tokens/CPU-s", "range", "ratio"]
    text = C.table(headers, rows)
    info = C.machine_info()
    note = (
        f"{repeats} repeats x {window:.0f}s windows after step {warmup}; {C.threads_note()}; "
        f"load average {load_before} before, {C.load_avg()} after; {info['cpu']}, {info['cores']} cores; "
        f"torch {info['torch']}; {info['date']}"
    )
    print(text)
    print(note)
    C.write_section("control_overhead" + ("_attached" if args.attached else ""), f"{text}\n\n{note}\n")


if __name__ == "__main__":
    main()

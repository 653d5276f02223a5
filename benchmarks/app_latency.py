"""3. Pause latency and 5c. app start to first frame, measured on a real pseudo-terminal (tmux, 120x40).

- first frame: spawn `tui-trainer open` (and `tui-trainer train`, which must show its first frame before
  torch is imported) and poll `tmux capture-pane` until the app's layout is on screen;
- pause: while `tui-trainer train` runs, `tmux send-keys p`, then poll until "Pausing" is on screen, and
  until the screen says the run is paused AND the new checkpoint verifies (sha256 of every file).
- pause, attached (`--attached`): the run trains in a `tui-trainer train --headless` process; the app is
  `tui-trainer attach` in the pane, so `p` travels over the control channel and the promised step comes back
  in the reply before "Pausing" can be drawn.
Polling is every ~10 ms (each capture-pane is itself a few ms), so figures carry that resolution.
Run: python benchmarks/app_latency.py [--quick] [--repeats N] [--threads N]
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
import _common as C


def app_drawn(screen: str) -> bool:
    return "Runs" in screen and ("Quit" in screen or "Help" in screen)  # border title and the footer


def first_frame(command: str) -> float:
    runs = C.fresh_dir("ff")
    if command == "open":
        cmd = [C.TUI, "open", "--runs-dir", str(runs)]
    else:
        cmd = [C.TUI, "train", "--run", "ff", "--runs-dir", str(runs), "--until-step", "1", *C.set_args()]
    tmux = C.pane(cmd)
    try:
        return tmux.wait_until(app_drawn, timeout=60, poll=0.01) - tmux.started
    finally:
        tmux.close()


def pause_latency(warm_steps: int, attached: bool = False) -> dict:
    from tui_trainer.core.errors import CheckpointInvalid
    from tui_trainer.core.store import RunStore, verify_checkpoint

    runs = C.fresh_dir("pause-attached" if attached else "pause")
    store = RunStore(runs)
    cmd = [C.TUI, "train", "--run", "p", "--runs-dir", str(runs), *C.set_args()]
    headless = None
    if attached:  # the run in its own process; the app attaches once it serves its channel
        headless = subprocess.Popen([*cmd, "--headless"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (runs / "p" / "control.sock").is_symlink():
            if time.time() > deadline or headless.poll() is not None:
                raise RuntimeError("the headless run never served its channel")
            time.sleep(0.05)
        cmd = [C.TUI, "attach", "p", "--runs-dir", str(runs)]
    tmux = C.pane(cmd)
    try:
        metrics = store.metrics_path("p")
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [r for r in C.read_jsonl(metrics) if "loss" in r]
            if len(steps) >= warm_steps:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("training never started:\n" + tmux.text())
        step_time = statistics.median(r["step_time"] for r in steps[1:])
        tmux.wait_for("Running", timeout=120)
        t0 = time.monotonic()  # the pane's clock
        tmux.send("p")
        t_pausing = tmux.wait_until(lambda s: "Pausing" in s, timeout=60, poll=0.005)

        def halted(screen: str) -> bool:
            if ("paused (pid" if attached else "paused at step") not in screen:
                return False
            ckpts = sorted(store.checkpoints_dir("p").glob("step-*"))
            try:
                return bool(ckpts) and bool(verify_checkpoint(ckpts[-1]))
            except CheckpointInvalid:
                return False

        t_halted = tmux.wait_until(halted, timeout=120, poll=0.01)
        record = json.loads((runs / "p" / "run.json").read_text())
        tmux.send("q")
        time.sleep(0.5)
        if headless is not None:
            headless.wait(60)
        return {
            "pausing_s": t_pausing - t0,
            "halted_s": t_halted - t0,
            "step_s": step_time,
            "status": record.get("status"),
        }
    finally:
        tmux.close()
        if headless is not None and headless.poll() is None:
            headless.kill()


def pause_table(runs: list[dict], pausing: str, expect: str) -> str:
    """The pause-latency table: `p` to "Pausing" on screen (`pausing`, expected `expect`), to halted."""
    rows = [
        [
            pausing,
            C.median([r["pausing_s"] for r in runs]) * 1000,
            C.spread([r["pausing_s"] * 1000 for r in runs]),
            expect,
        ],
        [
            "`p` → halted, checkpoint verified on disk",
            C.median([r["halted_s"] for r in runs]) * 1000,
            C.spread([r["halted_s"] * 1000 for r in runs]),
            "≤ one step + one save",
        ],
        ["(step time while running, for scale)", C.median([r["step_s"] for r in runs]) * 1000, "", ""],
    ]
    return C.table(["measure", "median (ms)", "range (ms)", "expect"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    C.common_args(ap)
    ap.add_argument("--attached", action="store_true", help="only the pause, with the app attached to a headless run")
    args = ap.parse_args()
    C.apply_common(args)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.attached:
        attached_main(repeats, 3 if args.quick else 8)
        return
    sides = {
        "first frame: tui-trainer open": lambda: first_frame("open"),
        "first frame: tui-trainer train": lambda: first_frame("train"),
        "pause": lambda: pause_latency(3 if args.quick else 8),
    }
    print(f"app latency: {repeats} interleaved repeats (load {C.load_avg()})")
    res = C.interleave(sides, repeats)
    p = res["pause"]
    text = "Pause latency (app in tmux 120x40):\n\n" + pause_table(
        p, '`p` → "Pausing" on screen', "one frame (< 100 ms)"
    )
    ff_rows = [
        [name.split(": ")[1], C.median(v) * 1000, C.spread([x * 1000 for x in v])]
        for name, v in res.items()
        if name.startswith("first frame")
    ]
    ff = (
        "App start to first frame (process spawn → run tree, plot and footer on the tmux screen; "
        "`train` shows it before torch is imported):\n\n" + C.table(["command", "median (ms)", "range (ms)"], ff_rows)
    )
    text += (
        f"\n\nrun.json status after the pause: {', '.join(sorted({r['status'] for r in p}))}. "
        f"{repeats} repeats, {C.threads_note()}, load average at the end: {C.load_avg()}."
    )
    print(text + "\n\n" + ff)
    C.write_section("pause_latency", text)
    C.write_section("first_frame", ff)


def attached_main(repeats: int, warm_steps: int) -> None:
    load = C.load_avg()
    runs = [pause_latency(warm_steps, attached=True) for _ in range(repeats)]
    text = (
        "Pause latency, app attached to a headless run (`tui-trainer attach` in tmux 120x40):\n\n"
        + pause_table(runs, '`p` → "Pausing" on screen (attached)', "< 100 ms")
        + f"\n\nrun.json status after the pause: {', '.join(sorted({r['status'] for r in runs}))}. "
        f"{repeats} repeats, {C.threads_note()}, load average {load} before, {C.load_avg()} after."
    )
    C.publish("pause_latency_attached", text)


if __name__ == "__main__":
    main()

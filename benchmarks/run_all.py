"""Run every benchmark and write the tables into BENCHMARKS.md (between the generated-section markers).

    python benchmarks/run_all.py [--quick] [--threads N] [--only throughput,checkpoint_cost,...]

Each script also runs alone (`python benchmarks/<name>.py [--quick]`) and prints its table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SCRIPTS = [  # (script, sections it writes, title)
    ("throughput.py", ["throughput"], "1. Throughput (tokens/s)"),
    ("checkpoint_cost.py", ["checkpoint_cost"], "2. Checkpoint cost"),
    ("app_latency.py", ["pause_latency", "first_frame"], "3. Pause latency / 5c. first frame"),
    ("resume_cost.py", ["resume_cost"], "4. Resume cost vs run length"),
    ("ui_scale.py", ["ui_scale"], "5. UI scale"),
    ("memory.py", ["memory"], "6. Memory"),
    ("profile_step.py", ["profile"], "Profile of the step loop"),
]
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/run_all.py) -->", "<!-- END GENERATED -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated script names (without .py)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    C.apply_common(args)
    only = {s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()}
    flags = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    sections = C.WORK / "sections"
    timings = {}
    for script, names, _title in SCRIPTS:
        if only and script.removesuffix(".py") not in only:
            continue
        for name in names:
            (sections / f"{name}.md").unlink(missing_ok=True)
        cmd = [C.PY, str(C.BENCH_DIR / script), *flags]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=C.ROOT).returncode
        timings[script] = (time.perf_counter() - t0, rc)
        meta = {
            "seconds": timings[script][0],
            "rc": rc,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": f"python benchmarks/{script} {' '.join(flags)}".strip(),
        }
        sections.mkdir(parents=True, exist_ok=True)
        (sections / f"{script}.meta.json").write_text(json.dumps(meta))
        if rc:
            print(f"!! {script} exited {rc}", flush=True)
    if args.no_write:
        return
    info = C.machine_info()
    invocation = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    out = [
        BEGIN,
        "",
        f"Written {info['date']} by `{invocation}` (each section names the command and time it was measured).",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    out += [f"| {k} | {v} |" for k, v in info.items() if k != "date"]
    out += [f"| load average at the end | {C.load_avg()} |", ""]
    # every script with a recorded result (a run with --only keeps the others' earlier results)
    for script, names, title in SCRIPTS:
        meta_path = sections / f"{script}.meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        rc = meta["rc"]
        out += [
            f"### {title}",
            "",
            f"`{meta['command']}` — {meta['seconds']:.0f} s, {meta['date']}" + (f", **exited {rc}**" if rc else ""),
            "",
        ]
        for name in names:
            path = sections / f"{name}.md"
            out += [path.read_text().strip() if path.exists() else "_no result_", ""]
    out.append(END)
    md = C.ROOT / "BENCHMARKS.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(out) + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(out) + "\n"
    md.write_text(text)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

"""The app's pure parts: curve data, downsampling, formats, style path, and the torch-free import."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.text import Text

from tui_trainer.core import fmt
from tui_trainer.tui.series import Curves, Series, downsample_mean, downsample_minmax, ema
from tui_trainer.tui.widgets.plot_maths import sci_number, short_number, step_ticks, value_ticks

REPO = Path(__file__).resolve().parent.parent


def test_app_module_does_not_import_torch() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import tui_trainer.tui.app; "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "print(bad, round(time.perf_counter() - t, 3))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.startswith("[]"), out.stdout + out.stderr


def test_styles_resolve_from_the_package() -> None:
    from tui_trainer.tui.app import styles_path

    path = styles_path()
    assert path.name == "app.tcss" and path.is_file()


def test_series_grows_and_keeps_order() -> None:
    s = Series(capacity=2)
    for i in range(1000):
        s.append(i, i * 2)
    s.extend(range(1000, 1100), range(2000, 2200, 2))
    assert len(s) == 1100
    assert s.x[-1] == 1099 and s.y[-1] == 2198 and s.last_x == 1099


def test_downsample_minmax_keeps_spikes_and_bounds_points() -> None:
    x = np.arange(1_000_000, dtype=float)
    y = np.ones_like(x)
    y[123_457] = 50.0  # one spike a stride would miss
    y[987_001] = -3.0
    dx, dy = downsample_minmax(x, y, 100)
    assert len(dx) <= 2 * 101
    assert dy.max() == 50.0 and dy.min() == -3.0
    assert np.all(np.diff(dx) >= 0), "points stay in step order"


def test_downsample_leaves_short_series_alone_and_drops_nan() -> None:
    x = np.arange(10, dtype=float)
    y = np.array([1, 2, np.nan, 4, 5, 6, np.inf, 8, 9, 10], dtype=float)
    dx, _dy = downsample_minmax(x, y, 100)
    assert list(dx) == [0, 1, 3, 4, 5, 7, 8, 9]
    mx, my = downsample_mean(np.arange(1000.0), np.arange(1000.0), 10)
    assert len(mx) <= 21 and abs(my.mean() - 499.5) < 30


def test_downsample_cost_does_not_grow_with_run_length() -> None:
    """A 1e6-point curve reduces to what the plot draws in about the time plotext needs for 1e3 points."""
    big = np.arange(1_000_000, dtype=float)
    start = time.perf_counter()
    bx, _ = downsample_minmax(big, np.sin(big), 110)
    elapsed = time.perf_counter() - start
    sx, _ = downsample_minmax(np.arange(1000.0), np.sin(np.arange(1000.0)), 110)
    assert len(bx) <= 2 * 111 and len(sx) <= 2 * 111
    assert elapsed < 0.5, f"downsampling 1e6 points took {elapsed:.3f}s"


def test_ema_is_debiased_and_skips_nan() -> None:
    values = np.array([4.0, 4.0, np.nan, 4.0])
    out, _, _ = ema(values, 0.9)
    assert np.allclose(out, 4.0)
    out, acc, weight = ema(np.array([1.0, 3.0]), 0.5)
    assert out[0] == 1.0 and out[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert acc / weight == pytest.approx(out[1])


def test_curves_overlay_a_branch_on_its_parent_history() -> None:
    parent = [{"step": s, "loss": 5.0 - s / 100, "lr": 1e-3} for s in range(1, 201)]
    parent += [{"step": 100, "eval_loss": 4.2}]
    own = [{"step": s, "loss": 3.0 - s / 1000, "lr": 3e-4} for s in range(101, 151)]
    curves = Curves.from_segments("b", [("a", [*parent[:100], parent[-1]]), ("b", own)], [100])
    assert curves.own_from == 100 and len(curves.loss) == 150
    assert curves.branch_points == [("a", 100)]
    assert curves.first_step == 1 and curves.last_step == 150
    assert len(curves.smooth) == len(curves.loss)
    # records at or before the newest step are ignored (the live buffer overlaps what was read from disk)
    curves.add_records([{"step": 150, "loss": 9.0}, {"step": 151, "loss": 2.0, "lr": 3e-4}])
    assert len(curves.loss) == 151 and curves.loss.y[-1] == 2.0
    curves.set_smoothing(0.0)
    assert np.array_equal(curves.smooth.y, curves.loss.y)


def test_formats_stay_narrow() -> None:
    assert fmt.duration(5) == "5s" and fmt.duration(125) == "2m05s" and fmt.duration(7300) == "2h01m"
    assert fmt.duration(None) == "–" and fmt.duration(float("inf")) == "–"
    assert fmt.age(3) == "now" and fmt.age(90) == "1m" and fmt.age(3 * 86400) == "3d"
    assert fmt.rate(12345.0) == "12.3k tok/s" and fmt.rate(None) == "– tok/s"
    assert fmt.size(812) == "812B" and fmt.size(1.5 * 2**20) == "1.5M" and fmt.size(None) == "–"
    assert fmt.loss(None) == "–" and fmt.loss(3.14159) == "3.142" and fmt.loss(float("nan")) == "nan"


def test_step_ticks_are_round_numbers() -> None:
    assert step_ticks(1, 400, 4) == [100, 200, 300, 400]
    assert step_ticks(0, 1_000_000, 5) == [0, 200_000, 400_000, 600_000, 800_000, 1_000_000]
    assert step_ticks(5, 5, 4) == [5]
    assert step_ticks(None, None, 4) == []
    assert [short_number(n) for n in (7, 1500, 12_000, 2_000_000)] == ["7", "1.5k", "12k", "2M"]


def test_y_ticks_read_like_numbers_people_write() -> None:
    """The lr view once read "1000000000.0000" (log) and "0.00002" (linear)."""
    log = value_ticks(1e-5, 1e-3, 5, log=True)
    assert [sci_number(t) for t in log] == ["1e-5", "1e-4", "1e-3"]
    linear = value_ticks(2e-5, 1e-3, 5)
    assert [sci_number(t) for t in linear] == ["2e-4", "4e-4", "6e-4", "8e-4", "1e-3"]
    assert value_ticks(1.6, 5.84, 6) == [2.0, 3.0, 4.0, 5.0]
    assert sci_number(2.5e-4) == "2.5e-4" and sci_number(0) == "0"


def test_device_panel_says_no_gpu_on_cpu_and_shows_cuda_memory() -> None:
    from tui_trainer.core.events import DeviceSample, StepLogged
    from tui_trainer.tui.widgets.device_panel import CORES, DevicePanel

    panel = DevicePanel()
    panel.sample = DeviceSample("r", "cpu", "cpu", rss_bytes=300 * 2**20, cpu_percent=150.0)
    panel.step, panel.live = StepLogged("r", 10, 3.0, 1e-3, 1280, 6400.0, 0.02, 100, 1.8), True
    text = panel.text(width=60).plain
    assert "CPU · no GPU" in text and f"RSS 300M · CPU 1.5/{CORES} cores" in text  # never "CPU 150%"
    assert "6.4k tok/s · 20 ms/step · ETA 2s" in text
    narrow = panel.text(width=20).plain.splitlines()
    assert max(len(line) for line in narrow) <= 20  # wraps between items instead of cutting "ETA 2s" off
    assert "20 ms/step · ETA 2s" in narrow and f"CPU 1.5/{CORES} cores" in narrow
    panel.sample = DeviceSample(
        "r",
        "cuda:0",
        "NVIDIA H100",
        allocated=2**30,
        reserved=2 * 2**30,
        peak=3 * 2**30,
        total=80 * 2**30,
        utilization=97.0,
        temperature_c=61.0,
        power_w=312.0,
    )
    text = panel.text(width=40).plain
    assert "NVIDIA H100" in text and "1.0G alloc · 2.0G rsv" in text and "peak 3.0G / 80.0G" in text
    assert "util 97%" in text and "61°C" in text and "312 W" in text
    panel.sample = DeviceSample("r", "cuda:0", "NVIDIA T4", allocated=2**20, total=16 * 2**30)
    assert "no NVML" in panel.text().plain
    panel.sample = DeviceSample("r", "mps", "Apple M2", allocated=512 * 2**20, rss_bytes=2**30, cpu_percent=80.0)
    assert "Apple GPU (mps)" in panel.text().plain and "512M allocated" in panel.text().plain


def test_lifecycle_allows_the_engine_story_and_refuses_the_rest() -> None:
    from tui_trainer.core.events import State
    from tui_trainer.tui.lifecycle import IllegalTransition, Lifecycle

    seen: list[State] = []
    life = Lifecycle(seen.append, strict=True)
    life.start()
    for state in (State.RUNNING, State.PAUSING, State.PAUSING, State.PAUSED):
        life.move(state)
    life.halted(State.PAUSED)
    assert seen == [State.STARTING, State.RUNNING, State.PAUSING, State.PAUSED] and not life.live
    with pytest.raises(IllegalTransition, match="Paused -> Running"):
        life.move(State.RUNNING)  # an ended run only starts again
    lenient = Lifecycle(seen.append)
    assert not lenient.move(State.FINISHED) and lenient.state == State.IDLE  # logged, not applied


def test_a_failure_is_recorded_once_and_outlives_the_engines_last_words() -> None:
    from tui_trainer.core.events import State
    from tui_trainer.tui.lifecycle import Lifecycle

    seen: list[State] = []
    life = Lifecycle(seen.append, strict=True)
    life.start()
    life.move(State.RUNNING)
    assert life.fail(7, "boom") == "Failed at step 7: boom"
    assert life.fail(7, "the trainer stopped on an error") is None  # the StateChanged and the worker's result
    assert not life.engine_state(State.PAUSED)  # the engine halting as Paused does not hide the failure
    life.halted(State.PAUSED)
    assert life.state == State.FAILED and life.exit_code() == 1 and seen[-1] == State.FAILED
    life.start()  # a resume forgets it
    assert life.failure is None and life.state == State.STARTING and life.exit_code() == 0


def test_what_a_key_may_do_and_why_not_comes_from_the_lifecycle_alone() -> None:
    from tui_trainer.core.events import State
    from tui_trainer.tui.lifecycle import Job, Lifecycle

    life = Lifecycle(lambda _: None, strict=True)
    assert life.refusal("pause", started=False) == "nothing is training: r resumes the selected checkpoint"
    assert life.refusal("resume", started=False) is None and life.refusal("generate", started=False) is None
    life.begin(Job.GENERATING, "r@10")
    assert life.refusal("generate", started=False) == "still generating from r@10…"
    life.end(Job.GENERATING)
    assert life.refusal("generate", started=False) is None
    life.begin(Job.CONNECTING, "bg")  # a run started in the background, not yet serving its channel
    assert life.refusal("branch", started=False) == "bg is starting in the background: one run at a time"
    assert life.refusal("attach", started=False) == "a run is shown live already: one at a time"
    life.end(Job.CONNECTING)
    life.start()
    assert life.refusal("resume", started=False) == "a run is training (one at a time): press p to pause it first"
    assert life.refusal("pause", started=False) == "the run is still starting"
    life.move(State.RUNNING)
    assert life.refusal("pause", started=True) is None and life.refusal("save", started=True) is None
    life.move(State.PAUSING)
    assert life.refusal("pause", started=True) == "already pausing"


def test_labels_fit_whole_or_cut_after_a_word_with_an_ellipsis() -> None:
    from tui_trainer.tui.widgets.text_fit import first_that_fits, fit, wrap_at_joints

    assert fit("demo running · none saved", 25).plain == "demo running · none saved"
    assert fit("demo-from200 running · none saved", 30).plain == "demo-from200 running · none…"
    assert fit("demo-from200 running · none saved", 27).plain == "demo-from200 running…"  # never "none sa"
    assert fit("  250 ◆   1.666/1.816   13s", 26).plain == "  250 ◆   1.666/1.816…"  # never the age "13"
    assert fit("demo-from40-with-a-long-name", 16).plain == "demo-from40-…"  # one word: cut at a joint
    assert fit("abcdefghij", 6).plain == "abcde…"  # no joint: anywhere
    styled = fit(Text.assemble(("demo", "bold"), (" paused", "dim")), 8)
    assert styled.plain == "demo…" and styled.spans[0].style == "bold"
    titles = ["Sample · demo@200 · 2/3", "demo@200 · 2/3", "demo@200"]
    assert first_that_fits(titles, 17) == "demo@200 · 2/3"
    assert first_that_fits(titles, 7) == "demo@…"
    name = "branched from demo-from40-with-a-long-name@60"
    assert wrap_at_joints(name, 30).splitlines() == ["branched from demo-from40-", "with-a-long-name@60"]
    assert wrap_at_joints("abcdefgh", 5).splitlines() == ["abcde", "fgh"]

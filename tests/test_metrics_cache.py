"""The columnar metrics cache answers exactly what parsing metrics.jsonl answers, and notices when the
file changed under it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tui_trainer.core.metrics_cache import CACHE_DIR, COLUMNS, INDEX, MetricColumns, read_metric_columns
from tui_trainer.core.store import MetricsWriter, RunStore, read_metrics
from tui_trainer.tui.history import load_curves
from tui_trainer.tui.series import Curves, ema


def line(**record: Any) -> str:
    return json.dumps(record) + "\n"


def train(step: int, loss: float | None = None, **extra: Any) -> str:
    loss = 5.0 - step * 0.01 if loss is None else loss
    return line(step=step, loss=loss, lr=1e-3, tokens=step * 64, tokens_per_s=900.0 + step, time=1e9 + step, **extra)


def messy_history() -> str:
    """What real files hold: evals, a diverged (null) loss, a torn line a crash left, a non-object line,
    a resume marker that supersedes a tail, and a grad norm on some lines."""
    parts = [train(s) for s in range(1, 21)]
    parts.append(line(step=10, eval_loss=4.5, time=1e9))
    parts.append(line(step=21, loss=None, lr=1e-3, nonfinite={"loss": "nan"}))  # superseded below
    parts.append('{"step": 22, "loss": 4.')  # torn by a crash; the next writer starts a fresh line
    parts.append("\n[1, 2]\n")
    parts.append(line(event="resume", step=15))
    parts += [train(s, loss=3.0, grad_norm=0.5 + s) for s in range(16, 31)]
    parts.append(line(step=20, eval_loss=4.0, time=1e9))
    parts.append(line(step=31, loss=None, lr=1e-3, nonfinite={"loss": "inf"}))
    return "".join(parts)


def assert_same(got: MetricColumns, path: Path) -> None:
    want = MetricColumns.from_records(read_metrics(path))
    assert len(got) == len(want) > 0
    for name in COLUMNS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # NaN == NaN here


def index(path: Path) -> dict[str, Any]:
    return json.loads((path.parent / CACHE_DIR / INDEX).read_text())


def test_cold_and_cached_reads_equal_the_jsonl_parse(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(messy_history() + '{"step": 32, "loss": 2.9}')  # a last line still being written
    cold = read_metric_columns(path, min_cache_bytes=0)
    assert_same(cold, path)
    # the cache covers whole lines only: the unfinished last one is parsed again next time
    assert index(path)["offset"] == len(messy_history().encode())
    cached = read_metric_columns(path, min_cache_bytes=0)
    assert_same(cached, path)
    assert np.isnan(cached["loss"][cached["step"] == 31]).all()  # the null loss is a gap, not a number
    assert set(cached["step"][~np.isnan(cached["grad_norm"])]) == set(range(16, 31))


def test_appended_lines_are_picked_up_including_a_resume_into_the_cached_part(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(messy_history())
    read_metric_columns(path, min_cache_bytes=0)
    with open(path, "a") as fh:
        fh.write("".join(train(s) for s in range(31, 41)))
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)
    assert index(path)["offset"] == path.stat().st_size
    with open(path, "a") as fh:
        fh.write(line(event="resume", step=25) + "".join(train(s, loss=1.0) for s in range(26, 29)))
    got = read_metric_columns(path, min_cache_bytes=0)
    assert_same(got, path)
    assert got["step"].max() == 28 and (got["loss"][got["step"] > 25] == 1.0).all()
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)  # and from the updated cache


def test_a_metrics_writer_appending_after_a_crash_is_followed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(train(s) for s in range(1, 6)) + '{"step": 6, "lo')  # killed mid-line
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)
    writer = MetricsWriter(path)  # the resumed run starts its lines on a fresh one
    writer.write({"event": "resume", "step": 5})
    writer.write({"step": 6, "loss": 4.0, "lr": 1e-3})
    writer.write({"step": 7, "loss": float("nan"), "lr": 1e-3})
    writer.close()
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)


def test_rewritten_truncated_or_replaced_file_invalidates_the_cache(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(messy_history())
    read_metric_columns(path, min_cache_bytes=0)
    # rewritten in place (same inode), longer than before: the last cached line no longer matches
    path.write_text("".join(train(s, loss=7.0) for s in range(1, 40)))
    got = read_metric_columns(path, min_cache_bytes=0)
    assert_same(got, path)
    assert (got["loss"] == 7.0).all()
    # truncated below what the cache covers
    path.write_text("".join(train(s, loss=6.0) for s in range(1, 4)))
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)
    # replaced by a new file whose bytes at the cached offset look the same (only the inode tells)
    read_metric_columns(path, min_cache_bytes=0)
    other = tmp_path / "other.jsonl"
    other.write_text(train(1, loss=9.0) + "".join(train(s, loss=6.0) for s in range(2, 4)))
    os.replace(other, path)
    got = read_metric_columns(path, min_cache_bytes=0)
    assert_same(got, path)
    assert got["loss"][0] == 9.0


def test_unwritable_cache_still_parses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(messy_history())
    (tmp_path / CACHE_DIR).write_text("not a directory")  # as good as a read-only run dir, even for root
    assert_same(read_metric_columns(path, min_cache_bytes=0), path)


def test_small_histories_write_no_cache(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(messy_history())
    assert_same(read_metric_columns(path), path)
    assert not (tmp_path / CACHE_DIR).exists()


def curves_arrays(curves: Curves) -> dict[str, np.ndarray]:
    out = {}
    for name in ("loss", "eval", "lr", "tps", "smooth"):
        series = getattr(curves, name)
        out[f"{name}.x"], out[f"{name}.y"] = series.x, series.y
    return out


def test_curves_from_columns_equal_curves_from_records(tmp_path):
    """The app's loader builds Curves from columns; it must draw what the records drew."""
    store = RunStore(tmp_path / "runs")
    store.create_run("a", {}, None)
    store.metrics_path("a").write_text(messy_history())
    store.create_run("b", {}, ("a", 18))
    store.metrics_path("b").write_text("".join(train(s, loss=2.0) for s in range(17, 40)))
    for smoothing in (0.9, 0.6):
        from_records = Curves.from_segments("b", store.history("b"), [18])
        from_records.set_smoothing(smoothing)
        from_columns = load_curves(store, "b", smoothing)
        want, got = curves_arrays(from_records), curves_arrays(from_columns)
        for name in want:
            # the smoothed curve is computed with array operations on one side: equal up to rounding
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
        assert (from_columns.own_from, from_columns.branch_points) == (from_records.own_from, [("a", 18)])


def test_vectorised_ema_matches_the_point_by_point_average():
    """ema() smooths a long history with array operations; it must draw what one point at a time draws
    (Curves extends the average that way as live steps arrive), NaN gaps and a continued average included."""
    rng = np.random.default_rng(0)
    for n in (1, 64, 65, 5000):
        values = rng.standard_normal(n) + 5.0
        values[rng.random(n) < 0.05] = np.nan
        values[0] = np.nan
        for smoothing in (0.0, 0.5, 0.9, 0.999):
            for acc, weight in ((0.0, 0.0), (3.0, 0.7)):
                curves = Curves(run="x", smoothing=smoothing, _acc=acc, _weight=weight)
                for i, v in enumerate(values.tolist()):
                    curves._push_smooth(float(i), v)
                smoothed, end_acc, end_weight = ema(values, smoothing, acc, weight)
                np.testing.assert_allclose(smoothed, curves.smooth.y, rtol=1e-12)
                assert end_acc == pytest.approx(curves._acc, rel=1e-12)
                assert end_weight == pytest.approx(curves._weight, rel=1e-12)


def test_restart_markers_survive_the_cache_and_go_with_the_rows_they_mark(tmp_path):
    """Resume markers with a reason (the run continued by itself) are the plot's restart marks: kept through
    a cold parse, the cache and an incremental load; a later resume below one drops it with its rows; a
    plain resume (a person's `resume`) marks nothing."""
    path = tmp_path / "metrics.jsonl"
    parts = [train(s) for s in range(1, 11)] + [line(event="resume", step=8, reason="elastic restart")]
    parts += [train(s) for s in range(9, 21)] + [line(event="resume", step=16)]  # a person's resume
    parts += [train(s) for s in range(17, 25)] + [line(event="resume", step=20, reason="requeue")]
    path.write_text("".join(parts))
    want = ((8.0, "elastic restart"), (20.0, "requeue"))
    assert read_metric_columns(path, min_cache_bytes=0).restarts == want  # cold, writes the cache
    assert read_metric_columns(path, min_cache_bytes=0).restarts == want  # from the cache
    assert index(path)["restarts"] == [list(r) for r in want]
    with open(path, "a") as fh:  # appended after the cached part: an incremental load
        fh.write("".join(train(s) for s in range(21, 30)) + line(event="resume", step=26, reason="auto-resume"))
    assert read_metric_columns(path, min_cache_bytes=0).restarts == (*want, (26.0, "auto-resume"))
    with open(path, "a") as fh:  # the newest checkpoint was invalid: continued from 12, below the restart at 20
        fh.write(line(event="resume", step=12, reason="auto-resume"))
    got = read_metric_columns(path, min_cache_bytes=0)
    assert got.restarts == ((8.0, "elastic restart"), (12.0, "auto-resume"))
    assert got["step"].max() == 12
    assert read_metric_columns(path, min_cache_bytes=0).restarts == got.restarts  # and from the cache
    assert got.upto(10).restarts == ((8.0, "elastic restart"),)  # a branch at 10 keeps the parent's mark


def test_the_curves_carry_the_restarts_of_the_run_and_its_parent(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.create_run("p", {}, None)
    store.metrics_path("p").write_text(
        "".join(train(s) for s in range(1, 7))
        + line(event="resume", step=4, reason="requeue")
        + "".join(train(s) for s in range(5, 13))
        + line(event="resume", step=10, reason="requeue")
    )
    store.create_run("b", {}, ("p", 8))
    store.metrics_path("b").write_text(
        line(event="resume", step=8, reason="auto-resume") + "".join(train(s) for s in range(9, 12))
    )
    curves = load_curves(store, "b", 0.9)
    assert curves.restarts == [(4.0, "requeue"), (8.0, "auto-resume")]  # the parent's at 10 is past the branch

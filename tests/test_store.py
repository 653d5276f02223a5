"""The on-disk store: run names and refs, metrics reading, retention rules, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tui_trainer.core.errors import UserError
from tui_trainer.core.store import (
    MetricsWriter,
    RunStore,
    parse_ref,
    read_metrics,
    read_run_id,
    validate_run_name,
    write_manifest,
)


def fake_checkpoint(store: RunStore, run: str, step: int, loss: float, eval_loss: float | None = None) -> Path:
    path = store.checkpoint_dir(run, step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * step)
    write_manifest(path, {"step": step, "run": run, "loss": loss, "eval_loss": eval_loss})
    return path


@pytest.fixture
def store(tmp_path) -> RunStore:
    s = RunStore(tmp_path)
    s.create_run("a", {}, None)
    return s


@pytest.mark.parametrize("ref", ["a@x", "a@", "a@-1", "../a", "a/b@3", "", "@3"])
def test_malformed_refs_are_refused(ref):
    with pytest.raises(UserError):
        parse_ref(ref)


def test_refs_parse():
    assert parse_ref("run-1") == ("run-1", None)
    assert parse_ref("run-1@120") == ("run-1", 120)


def test_run_name_with_path_separator_is_refused():
    with pytest.raises(UserError, match="path separator"):
        validate_run_name("a/b")


def test_read_metrics_skips_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_resume_marker_supersedes_later_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"event": "resume", "step": 4}]
    lines += [{"step": s, "loss": 2.0} for s in range(5, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in records[4:]] == [2.0, 2.0, 2.0]


def test_keep_last_keeps_newest_n(store):
    for step in (10, 20, 30, 40):
        fake_checkpoint(store, "a", step, loss=1.0 / step)
    victims = store.apply_retention("a", keep_last=2)
    assert [v.step for v in victims] == [10, 20]
    assert [c.step for c in store.run("a").checkpoints] == [30, 40]


def test_keep_last_never_deletes_the_best(store):
    fake_checkpoint(store, "a", 10, loss=0.5, eval_loss=0.1)
    for step in (20, 30, 40):
        fake_checkpoint(store, "a", step, loss=0.4, eval_loss=0.9)
    store.apply_retention("a", keep_last=1)
    assert [c.step for c in store.run("a").checkpoints] == [10, 40]


def test_keep_last_never_deletes_pinned(store):
    for step in (10, 20, 30):
        fake_checkpoint(store, "a", step, loss=1.0 / step)
    store.set_pinned("a", 10, True)
    store.apply_retention("a", keep_last=1)
    assert [c.step for c in store.run("a").checkpoints] == [10, 30]
    assert store.run("a").checkpoints[0].pinned


def test_keep_last_never_deletes_branch_parent(store):
    for step in (10, 20, 30):
        fake_checkpoint(store, "a", step, loss=1.0 / step)
    store.create_run("b", {}, ("a", 20))
    store.apply_retention("a", keep_last=1)
    assert [c.step for c in store.run("a").checkpoints] == [20, 30]


def test_keep_last_never_deletes_the_newest_even_when_invalid_ones_follow(store):
    fake_checkpoint(store, "a", 10, loss=1.0)
    broken = store.checkpoint_dir("a", 20)
    broken.mkdir(parents=True)  # no manifest: not a checkpoint
    store.apply_retention("a", keep_last=1)
    assert [c.step for c in store.run("a").checkpoints if c.valid] == [10]


def test_checkpoint_without_manifest_is_invalid_and_temp_dirs_are_cleaned(store):
    fake_checkpoint(store, "a", 10, loss=1.0)
    (store.checkpoints_dir("a") / ".tmp-step-00000020-abcd").mkdir()
    store.checkpoint_dir("a", 30).mkdir()
    info = store.run("a")
    assert [(c.step, c.valid) for c in info.checkpoints] == [(10, True), (30, False)]
    assert info.newest.step == 10
    assert len(store.clean_temp_dirs("a")) == 1


def test_lineage_and_history_follow_the_branch_point(store):
    store.create_run("b", {}, ("a", 2))
    store.create_run("c", {}, ("b", 3))
    for run, steps in (("a", range(1, 6)), ("b", range(3, 6)), ("c", range(4, 6))):
        with open(store.metrics_path(run), "a") as fh:
            for s in steps:
                fh.write(json.dumps({"step": s, "loss": float(s)}) + "\n")
    history = store.history("c")
    assert [(run, [r["step"] for r in recs]) for run, recs in history] == [("a", [1, 2]), ("b", [3]), ("c", [4, 5])]


def test_an_unreadable_run_json_does_not_hide_the_other_runs(store):
    store.create_run("b", {}, ("a", 10))
    (store.run_dir("a") / "run.json").write_text("{not json")
    runs = {r.name: r for r in store.runs()}
    assert runs["b"].status == "created"
    assert runs["a"].status == "damaged" and "run.json is not valid JSON" in runs["a"].damaged


def strict_json(text: str) -> object:
    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} is not standard JSON")

    return json.loads(text, parse_constant=reject)


def test_non_finite_numbers_are_written_as_null_with_a_flag(store):
    writer = MetricsWriter(store.metrics_path("a"))
    writer.write({"step": 1, "loss": 2.5})
    writer.write({"step": 2, "loss": float("nan"), "lr": 1e-3})
    writer.write({"step": 2, "eval_loss": float("inf")})
    writer.close()
    lines = [strict_json(line) for line in store.metrics_path("a").read_text().splitlines()]
    assert lines[1] == {"step": 2, "loss": None, "lr": 1e-3, "nonfinite": {"loss": "nan"}}
    assert lines[2] == {"step": 2, "eval_loss": None, "nonfinite": {"eval_loss": "inf"}}
    assert [r.get("loss") for r in store.metrics("a")] == [2.5, None, None]  # readers see a gap
    path = fake_checkpoint(store, "a", 3, float("nan"), float("-inf"))
    manifest = strict_json((path / "manifest.json").read_text())
    assert manifest["loss"] is None and manifest["nonfinite"] == {"loss": "nan", "eval_loss": "-inf"}
    assert store.run("a").checkpoints[0].loss is None


def test_writers_refuse_non_finite_json_loudly(store):
    with pytest.raises(ValueError):
        store.update_record("a", config={"optim": {"lr": float("inf")}})


def test_best_is_the_lowest_measured_eval_and_none_without_one(store):
    for step in (10, 20):
        fake_checkpoint(store, "a", step, loss=1.0 / step)
    assert store.run("a").best is None  # train loss never makes a checkpoint "best"
    fake_checkpoint(store, "a", 30, loss=0.9, eval_loss=2.0)
    fake_checkpoint(store, "a", 40, loss=0.8, eval_loss=float("nan"))
    best = store.run("a").best
    assert best is not None and best.step == 30


def test_an_older_manifests_inherited_eval_is_not_shown(tmp_path):
    """Manifests written before `eval_step` carried the last eval, even one from an earlier step: an eval
    is trusted only at a step the run evaluates."""
    store = RunStore(tmp_path)
    store.create_run("old", {"train": {"eval_every": 100, "max_steps": 500}}, None)
    fake_checkpoint(store, "old", 100, loss=6.0, eval_loss=5.8)
    fake_checkpoint(store, "old", 182, loss=5.5, eval_loss=5.8)  # step 100's eval, 82 steps stale
    fake_checkpoint(store, "old", 500, loss=5.0, eval_loss=5.1)  # the final eval at max_steps
    assert {c.step: c.eval_loss for c in store.run("old").checkpoints} == {100: 5.8, 182: None, 500: 5.1}


def test_each_run_gets_its_own_random_id_and_an_old_record_has_none(tmp_path):
    store = RunStore(tmp_path)
    store.create_run("one", {}, None)
    store.create_run("two", {}, None)
    ids = {read_run_id(store.run_dir(n)) for n in ("one", "two")}
    assert len(ids) == 2 and all(isinstance(i, str) and len(i) == 32 for i in ids)
    assert store.read_record("one")["run_id"] == read_run_id(store.run_dir("one"))
    # a record from before ids (or one whose id is not ours to trust) reads as no id
    for value in (None, 5, "../../x", "A" * 32):
        record = {k: v for k, v in store.read_record("one").items() if k != "run_id"}
        if value is not None:
            record["run_id"] = value
        (store.run_dir("one") / "run.json").write_text(json.dumps(record))
        assert read_run_id(store.run_dir("one")) is None

"""Every file under the runs dir is untrusted input (ARCHITECTURE.md, "Threat model"; issue 20): a planted
symlink reaches nothing outside, a damaged run.json or a lineage loop harms only its own run, a manifest
names only plain files of its checkpoint, invalid UTF-8 is skipped. Real runs, real files, real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.app import build_demo_store, fixed_clock, fixed_probe, plot_ready
from support.files import tree_digest

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import MANIFEST, RunStore, hash_file, validate_run_name
from tui_trainer.engine.trainer import Trainer
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.widgets.run_tree import NodeRef

SECRET = "SECRET=hunter2\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus) -> tuple[Path, list[str]]:
    """Run `p`: paused at step 8 of 12, checkpoints at 4 and 8 (`resume p` continues it in place)."""
    from conftest import tiny_overrides

    overrides = tiny_overrides(small_corpus)
    root = tmp_path_factory.mktemp("untrusted") / "runs"
    store = RunStore(root)
    plan = plan_train(store, load_config(None, overrides), "p")
    assert Trainer(store, plan, until_step=8).run() == State.PAUSED
    return root, overrides


@pytest.fixture
def store(trained, tmp_path) -> RunStore:
    shutil.copytree(trained[0], tmp_path / "runs")
    return RunStore(tmp_path / "runs")


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def link(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


# ---------------------------------------------------------------- 1. planted symlinks


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "samples.jsonl"])
def test_a_symlinked_run_file_is_refused_and_its_target_untouched_and_unread(store, secret, capsys, name):
    link(store.run_dir("p") / name, secret)
    code, out, err = run_cli(capsys, "resume", "p", "--headless", "--runs-dir", str(store.root))
    assert code == 2, err
    assert f"{store.run_dir('p') / name}: is a symlink; refusing to follow it out of the runs dir" in err, err
    assert "hunter2" not in out + err, "the target's content is never echoed"
    assert secret.read_text() == SECRET, "the link's target is neither truncated nor appended to"
    assert store.read_record("p")["status"] == "paused", "nothing is left marked running"


def test_a_symlinked_train_log_is_refused_before_a_detached_run_starts(tmp_path, tiny, secret, capsys):
    runs = tmp_path / "runs"
    (runs / "d").mkdir(parents=True)
    link(runs / "d" / "train.log", secret)
    args = ["train", "--detach", "--name", "d", "--runs-dir", str(runs), *[a for o in tiny() for a in ("--set", o)]]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and f"{runs / 'd' / 'train.log'}: is a symlink" in err, out + err
    assert secret.read_text() == SECRET and not (runs / "d" / "run.json").exists()


def test_a_lock_file_with_foreign_content_is_never_echoed(store, capsys):
    (store.run_dir("p") / ".lock").write_text(SECRET)  # a regular file, not a pid line of ours
    code, _, err = run_cli(capsys, "resume", "p", "--headless", "--runs-dir", str(store.root))
    assert code == 0, err
    assert "hunter2" not in err


def test_a_symlinked_run_json_is_a_damaged_run_and_samples_are_not_followed(store, secret, capsys):
    (store.root / "q").mkdir()
    link(store.root / "q" / "run.json", secret)
    link(store.samples_path("p"), secret)
    code, out, _ = run_cli(capsys, "ls", "--runs-dir", str(store.root))
    assert code == 0
    assert "q  [damaged]" in out and "is a symlink" in out and "hunter2" not in out, out
    assert store.samples("p") == [] and store.metrics("p")


def test_a_fifo_as_metrics_jsonl_does_not_hang_a_reader(store, tmp_path):
    metrics = store.metrics_path("p")
    metrics.unlink()
    os.mkfifo(metrics)
    code = "import sys; from tui_trainer.cli import main; sys.exit(main(['ls', '--runs-dir', sys.argv[1]]))"
    done = subprocess.run([sys.executable, "-c", code, str(store.root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert store.metrics("p") == []


# ---------------------------------------------------------------- 3. damaged run.json


DAMAGED = {
    "a list": ("[]", "not a JSON object"),
    "parent a string": ('{"parent": "x"}', "parent is 'x'"),
    "parent step abc": ('{"parent": {"run": "p", "step": "abc"}}', "parent is"),
    "pinned a number": ('{"pinned": 5}', "pinned is 5"),
    "world_size abc": ('{"world_size": "abc"}', "world_size is 'abc'"),
    "not JSON": ("{nope", "not valid JSON"),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_run_json_is_one_line_in_ls_and_stops_nothing_else(store, capsys, kind):
    text, problem = DAMAGED[kind]
    (store.root / "zz").mkdir()
    (store.root / "zz" / "run.json").write_text(text)
    runs = ["--runs-dir", str(store.root)]

    code, out, err = run_cli(capsys, "ls", *runs)
    assert code == 0 and "Traceback" not in err, err
    damaged = [line for line in out.splitlines() if line.startswith("zz")]
    assert len(damaged) == 1 and "[damaged]" in damaged[0] and problem in damaged[0], out
    assert "p  [paused]" in out
    code, out, _ = run_cli(capsys, "ls", "--json", *runs)
    listed = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and problem in listed["zz"]["damaged"] and listed["p"]["damaged"] is None
    assert run_cli(capsys, "verify", *runs)[0] == 0
    code, _, err = run_cli(capsys, "resume", "zz", "--headless", *runs)
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "export", "p@8", str(store.root.parent / "out"), *runs)
    assert code == 0, err


def test_a_live_training_prunes_past_a_damaged_run(store, trained, capsys):
    """Retention reads every run's record (a branch's parent is protected): a damaged one is skipped."""
    (store.root / "zz").mkdir()
    (store.root / "zz" / "run.json").write_text('{"parent": "x"}')
    code, _, err = run_cli(
        capsys,
        "train",
        "--headless",
        "--name",
        "r",
        "--runs-dir",
        str(store.root),
        *[a for o in trained[1] for a in ("--set", o)],
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "checkpoint.keep_last=1",
    )
    assert code == 0, err
    assert store.read_record("r")["status"] == "finished"
    assert [c.step for c in store.run("r").checkpoints] == [12]


# ---------------------------------------------------------------- 4. lineage loops


def test_runs_naming_each_other_as_parent_stay_listed_and_the_loop_is_named(store, capsys):
    store.create_run("x", {}, ("y", 4))
    store.create_run("y", {}, ("x", 4))
    code, out, _ = run_cli(capsys, "ls", "--runs-dir", str(store.root))
    assert code == 0
    assert "x  [created]" in out and "y  [created]" in out, out
    assert "parent loop: x -> y -> x" in out and "parent loop: y -> x -> y" in out, out
    listed = {r["name"]: r for r in json.loads(run_cli(capsys, "ls", "--json", "--runs-dir", str(store.root))[1])}
    assert set(listed) == {"p", "x", "y"} and listed["x"]["cycle"] == ["x", "y", "x"]
    assert [run for run, _ in store.lineage("x")] == ["y", "x"]


def test_a_branch_named_after_a_deleted_ancestor_is_refused(store, capsys):
    runs = ["--runs-dir", str(store.root)]
    assert run_cli(capsys, "branch", "p@8", "--name", "y", "--headless", *runs)[0] == 0
    shutil.rmtree(store.run_dir("p"))
    code, _, err = run_cli(capsys, "branch", "y", "--name", "p", "--headless", "--set", "train.max_steps=16", *runs)
    assert code == 2 and "y's lineage records an ancestor of that name (deleted since)" in err, err
    assert sorted(p.name for p in store.root.iterdir()) == ["y"]


async def test_the_app_marks_a_damaged_run_and_a_parent_loop_in_its_tree(tmp_path):
    store = build_demo_store(tmp_path / "runs")
    (store.root / "zz").mkdir()
    (store.root / "zz" / "run.json").write_text("[]")
    store.create_run("x", {}, ("y", 4))
    store.create_run("y", {}, ("x", 4))
    app = TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        tree = app.main.runs_tree
        assert "zz ✗ damaged" in str(tree._by_ref[NodeRef("zz")].label)
        assert "parent loop" in str(tree._by_ref[NodeRef("x")].label)
        assert "parent loop" in str(tree._by_ref[NodeRef("y")].label)
        assert tree.select_ref(NodeRef("zz"))
        await pilot.pause()
        details = str(app.main.query_one("#details").content)
        assert "damaged:" in details and "not a JSON object" in details


# ---------------------------------------------------------------- 5. manifest entries


def _add_entry(ckpt: Path, name: str, entry: dict) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = entry
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../../../../../../../../etc/passwd", "/dev/zero", "sub/x", ".."])
def test_a_manifest_entry_outside_the_checkpoint_dir_is_refused(store, capsys, name):
    ckpt = store.checkpoint_dir("p", 8)
    entry = {"size": 0, "xxh3_128": "0"}
    if Path("/etc/passwd").exists() and "passwd" in name:
        entry = {"size": Path("/etc/passwd").stat().st_size, "xxh3_128": hash_file(Path("/etc/passwd"))}
    _add_entry(ckpt, name, entry)
    code, out, _ = run_cli(capsys, "verify", "p@8", "--runs-dir", str(store.root))
    assert code == 1 and "not a plain file name in the checkpoint dir" in out, out
    assert store.run("p").checkpoints[-1].valid is False


def test_a_fifo_listed_in_a_manifest_is_refused_without_hanging(store):
    ckpt = store.checkpoint_dir("p", 8)
    os.mkfifo(ckpt / "pipe")
    _add_entry(ckpt, "pipe", {"size": 0, "xxh3_128": "0"})
    code = "import sys; from tui_trainer.cli import main; sys.exit(main(['verify', '--runs-dir', sys.argv[1]]))"
    done = subprocess.run([sys.executable, "-c", code, str(store.root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"{ckpt / 'pipe'}: not a regular file" in done.stdout, done.stdout + done.stderr


def test_a_symlinked_checkpoint_file_is_never_hashed_through(store, secret, capsys):
    ckpt = store.checkpoint_dir("p", 8)
    link(ckpt / "rng.pt", secret)
    _add_entry(ckpt, "rng.pt", {"size": len(SECRET), "xxh3_128": hash_file(secret)})  # forged to match
    code, out, _ = run_cli(capsys, "verify", "p@8", "--runs-dir", str(store.root))
    assert code == 1 and f"{ckpt / 'rng.pt'}: not a regular file" in out, out


# ---------------------------------------------------------------- 9. invalid UTF-8


async def test_invalid_utf8_in_samples_jsonl_never_crashes_the_app(tmp_path):
    store = build_demo_store(tmp_path / "runs")
    good = json.dumps({"step": 5, "prompt": "", "text": "fine", "time": 0.0}).encode()
    store.samples_path("demo").write_bytes(good + b"\n" + b'{"step": 6, "text": "\xff\xfe bad"}\n' + good + b"\n")
    assert [s["text"] for s in store.samples("demo")] == ["fine", "fine"]
    app = TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        assert app.main.runs_tree.select_ref(NodeRef("demo", 100))
        await pilot.pause()
        assert app.main.runs_tree.select_ref(NodeRef("demo"))
        await pilot.pause()
        assert app.is_running


# ---------------------------------------------------------------- 10. smaller ones


@pytest.mark.parametrize("name", ["nl\n", "a\nb", "ok\r"])
def test_a_run_name_with_a_newline_is_refused(store, capsys, name):
    with pytest.raises(UserError):
        validate_run_name(name)
    runs = ["--runs-dir", str(store.root)]
    code, _, err = run_cli(capsys, "branch", "p@8", "--name", name, "--headless", *runs)
    assert code == 2 and "run name" in err, err
    assert sorted(p.name for p in store.root.iterdir()) == ["p"]


def test_a_stale_export_temp_dir_of_a_killed_export_is_cleaned(store, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".tmp-export-out.{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(capsys, "export", "p@8", str(tmp_path / "out"), "--runs-dir", str(store.root))
    assert code == 0, err
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_retention_through_a_symlinked_checkpoint_drops_only_the_link(store, tmp_path):
    elsewhere = tmp_path / "kept-step-4"
    ckpt = store.checkpoint_dir("p", 4)
    shutil.move(ckpt, elsewhere)
    ckpt.symlink_to(elsewhere)
    before = tree_digest(elsewhere)
    deleted = store.apply_retention("p", keep_last=1)
    assert [c.step for c in deleted] == [4]
    assert sorted(p.name for p in store.checkpoints_dir("p").iterdir()) == ["step-00000008"], "no .tmp-del link"
    assert tree_digest(elsewhere) == before, "the link's target is never deleted"

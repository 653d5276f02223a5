"""Disk full, read-only and permission errors while saving: a clear message, the run pauses (no crash,
no traceback), older checkpoints stay intact, no temp dir is left behind, and resume is still exact.

Real faults where the machine allows it (a tiny tmpfs filled to ENOSPC, a read-only remount); injected
OSErrors for EACCES (root ignores chmod) and for the asynchronous writer path."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from faults_support import cli, fill, install, losses, reference, remount, sets, temp_dirs, tmpfs  # noqa: F401
from support.files import tree_digest

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import Failed, State, StepLogged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine import checkpoint_files
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.trainer import Trainer


def resume_to_the_end_matches(store: RunStore, run: str, overrides: list[str]) -> None:
    assert Trainer(store, plan_resume(store, run)).run() == State.FINISHED
    assert losses(store, run) == reference(overrides)[0]
    assert temp_dirs(store, run) == []


@pytest.mark.slow
def test_disk_full_in_the_async_writer_pauses_with_a_message_and_loses_nothing(tmp_path, tmpfs, tiny):  # noqa: F811
    """The real CLI on a real 4 MB filesystem that fills up: the background write of step 8 fails."""
    mnt = tmpfs("4m")
    runs = mnt / "runs"
    overrides = tiny()  # checkpoints every 4 steps, async writer on (the default)
    store = RunStore(runs)
    config = load_config(None, overrides)
    assert Trainer(store, plan_train(store, config, "d"), until_step=4).run() == State.PAUSED
    before = tree_digest(store.checkpoint_dir("d", 4))
    ballast = fill(mnt, leave=64 * 1024)  # room for metrics lines, not for a ~300 KB checkpoint

    out = cli("resume", "d", "--headless", "--runs-dir", str(runs), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "could not save checkpoint step 8" in out.stderr and "No space left on device" in out.stderr, out.stderr
    assert "older checkpoints are intact" in out.stderr and "Paused d" in out.stderr
    assert "Traceback" not in out.stderr
    assert [c.step for c in store.run("d").checkpoints] == [4]
    assert tree_digest(store.checkpoint_dir("d", 4)) == before
    verify_checkpoint(store.checkpoint_dir("d", 4))
    assert temp_dirs(store, "d") == []
    assert store.read_record("d")["status"] == "paused"

    ballast.unlink()  # the person frees space and resumes: the curve is the uninterrupted one
    resume_to_the_end_matches(store, "d", overrides)


def test_read_only_checkpoints_volume_pauses_with_a_message(tmp_path, tmpfs, tiny):  # noqa: F811
    """The checkpoints dir turns read-only mid-run (as ext4 does on errors=remount-ro)."""
    store = RunStore(tmp_path / "runs")
    overrides = tiny(checkpoint__async_save=False)
    plan = plan_train(store, load_config(None, overrides), "ro")
    mnt = tmpfs("8m")
    mounted: list = []
    events: list = []

    def sink(event):
        events.append(event)
        if not mounted and isinstance(event, StepLogged) and event.step == 5:
            # move the run's checkpoints onto their own filesystem, then make it read-only
            shutil.copytree(store.checkpoints_dir("ro"), mnt / "c")
            shutil.rmtree(store.checkpoints_dir("ro"))
            store.checkpoints_dir("ro").symlink_to(mnt / "c")
            remount(mnt, "ro")
            mounted.append(mnt)

    assert Trainer(store, plan, sink).run() == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "disk"
    assert "could not save checkpoint step 8" in failed[0].message
    assert "Read-only file system" in failed[0].message
    assert [c.step for c in store.run("ro").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("ro", 4))
    assert temp_dirs(store, "ro") == []
    assert mounted, "the fault was never injected"
    remount(mnt, "rw")
    resume_to_the_end_matches(store, "ro", overrides)


def test_read_only_runs_dir_is_one_line_and_writes_nothing(tmp_path, tmpfs, tiny, capsys):  # noqa: F811
    mnt = tmpfs("8m")
    runs = mnt / "runs"
    overrides = tiny()
    assert (
        main(["train", "--run", "r", "--headless", "--until-step", "4", "--runs-dir", str(runs), *sets(overrides)]) == 0
    )
    before = tree_digest(runs)
    remount(mnt, "ro")
    capsys.readouterr()
    for args in (["resume", "r"], ["train", "--run", "r2", *sets(overrides)]):
        assert main([*args, "--headless", "--runs-dir", str(runs)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # progress may say "Starting"; the problem is one line, the last, naming the file and the cause
        assert [line for line in err if "error" in line] == err[-1:], err
        assert "Read-only file system" in err[-1] and str(runs) in err[-1], err
    assert tree_digest(runs) == before
    # browsing a read-only store still works
    assert main(["verify", "r", "--runs-dir", str(runs)]) == 0


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_permission_denied_mid_checkpoint_pauses_and_removes_the_temp_dir(tmp_path, tiny, monkeypatch, async_save):
    """EACCES injected into the weights write of step 8, after the temp dir and config were written."""
    store = RunStore(tmp_path / "runs")
    overrides = tiny(checkpoint__async_save=async_save)

    def denied(path):
        if "step-00000008" in str(path) and path.name == "model.safetensors":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    events: list = []
    plan = plan_train(store, load_config(None, overrides), "p")
    trainer = Trainer(store, plan, events.append, hooks=Hooks(before_checkpoint_file=denied))
    assert trainer.run() == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "disk", failed
    assert "could not save checkpoint step 8" in failed[0].message
    assert "Permission denied (writing model.safetensors)" in failed[0].message
    # fault as data: the last good checkpoint by reference, no front end's advice in the engine's words
    assert failed[0].last_good == "p@4" and "tui-trainer" not in failed[0].message
    assert [c.step for c in store.run("p").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("p", 4))
    assert temp_dirs(store, "p") == []
    resume_to_the_end_matches(store, "p", overrides)


def test_disk_full_while_logging_metrics_pauses_too(tmp_path, tiny, monkeypatch, capsys):
    """ENOSPC from a metrics line (not a checkpoint): the same clear pause, via the real CLI entry point."""
    runs = tmp_path / "runs"

    def full(record):
        if record.get("step") == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(RunStore(runs).metrics_path("m")))

    install(monkeypatch, Hooks(before_metrics_write=full))
    overrides = tiny()
    assert main(["train", "--run", "m", "--headless", "--runs-dir", str(runs), *sets(overrides)]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl: No space left on device" in err and "paused at step 6" in err, err
    assert "free space or fix permissions, then `tui-trainer resume m`" in err, err  # the CLI's own remedy
    assert "Traceback" not in err
    store = RunStore(runs)
    assert [c.step for c in store.run("m").checkpoints] == [4]
    monkeypatch.undo()
    resume_to_the_end_matches(store, "m", overrides)


def test_torch_and_safetensors_write_failures_surface_as_oserrors(tmpfs):  # noqa: F811
    """torch.save to a path reports a full disk as an opaque RuntimeError; ours says ENOSPC and the file."""
    mnt = tmpfs("64k")
    big = {"w": torch.zeros(100_000)}
    with pytest.raises(OSError) as info:
        checkpoint_files.torch_save(big, mnt / "optimizer.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(mnt / "optimizer.pt")
    (mnt / "optimizer.pt").unlink(missing_ok=True)
    with pytest.raises(OSError) as info:
        checkpoint_files.save_weights(big, mnt / "model.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(mnt / "model.safetensors")
    (mnt / "model.safetensors").unlink(missing_ok=True)
    fill(mnt, leave=0)  # a small state that fails only when the last buffer is flushed
    with pytest.raises(OSError) as info:
        checkpoint_files.torch_save({"step": 3}, mnt / "scheduler.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(mnt / "scheduler.pt")

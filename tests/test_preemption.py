"""Preemption (issue 24): a run that continues itself when a supervisor runs the same command line again —
`train --auto-resume`, torchrun's elastic restarts, Slurm's SIGUSR1 before the time limit. Real processes,
real signals, tiny models; losses compared bit for bit with an uninterrupted run.

A run is held at a known step by a fault hook that waits for a file (`hold_at_step`), so a kill or a signal
lands mid-run at the same place every time, however loaded the machine is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults_support import Proc, cli, losses, sets
from faults_support import reference as in_process_reference
from support.files import tree_digest
from support.waiting import wait_for
from test_ddp import reference  # noqa: F401 - the uninterrupted 2-rank run's losses (a module fixture)

from tui_trainer.core.store import RunStore
from tui_trainer.engine import faults

HOLD_STEP, HOLD_FILE, RELEASE_FILE = "TEST_HOLD_STEP", "TEST_HOLD_FILE", "TEST_RELEASE_FILE"


def hold_at_step() -> faults.Hooks:
    """For a CLI subprocess: after optimizer step $TEST_HOLD_STEP, touch $TEST_HOLD_FILE and wait until
    $TEST_RELEASE_FILE exists (forever if it never does: the test kills the process). Only a first start
    holds: a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) runs through."""
    step = int(os.environ[HOLD_STEP])
    held, release = Path(os.environ[HOLD_FILE]), Path(os.environ[RELEASE_FILE])

    def after_step(done: int, model: object) -> None:
        if done != step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        held.touch()
        while not release.exists():
            time.sleep(0.01)

    return faults.Hooks(after_optimizer_step=after_step)


def held(tmp_path: Path, step: int) -> dict[str, str]:
    return {HOLD_STEP: str(step), HOLD_FILE: str(tmp_path / "held"), RELEASE_FILE: str(tmp_path / "release")}


def newest_step(store: RunStore, run: str) -> int:
    newest = store.run(run).newest if store.exists(run) else None
    return newest.step if newest else 0


def markers(store: RunStore, run: str) -> list[dict]:
    from faults_support import metric_lines

    return [r for r in metric_lines(store.metrics_path(run)) if r.get("event") == "resume"]


@dataclass
class AutoResumed:
    """`train --name q --auto-resume` run, killed (-9) at step 6 and run again to the end (12)."""

    store: RunStore
    args: list[str]
    cwd: Path
    expected: list[float]  # an uninterrupted run's losses
    again: subprocess.CompletedProcess[str]  # the second run


@pytest.fixture(scope="module")
def auto_resumed(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> AutoResumed:
    """Built once: the CLI test checks how it continued, the app test that the plot marks the restart."""
    from conftest import tiny_overrides

    tmp_path = tmp_path_factory.mktemp("auto-resumed")
    overrides = tiny_overrides(small_corpus, train__max_steps=12, checkpoint__every_steps=4)
    expected, _ = in_process_reference(overrides)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--name", "q", "--auto-resume", "--headless", "--runs-dir", str(store.root), *sets(overrides)]

    # first start: the run does not exist, so it starts; killed (-9) at step 6, after checkpoint 4 landed
    first = Proc(args, tmp_path, faults_from="test_preemption:hold_at_step", env=held(tmp_path, 6))
    wait_for(lambda: (tmp_path / "held").exists() or not first.alive(), 90, "the run to reach step 6")
    wait_for(lambda: newest_step(store, "q") == 4, 30, "checkpoint 4 on disk")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    # the same command again
    again = cli(*args, cwd=tmp_path, timeout=120)
    return AutoResumed(store, args, tmp_path, expected, again)


@pytest.mark.slow
def test_auto_resume_starts_continues_after_kill_9_finishes_once_and_refuses_changed_settings(auto_resumed):
    store, args, tmp_path, expected, again = (
        auto_resumed.store,
        auto_resumed.args,
        auto_resumed.cwd,
        auto_resumed.expected,
        auto_resumed.again,
    )
    # the second run continued from checkpoint 4, exactly
    assert again.returncode == 0, again.stderr
    assert "auto-resume: continuing q from step 4" in again.stderr, again.stderr
    assert losses(store, "q") == expected
    assert [m.get("reason") for m in markers(store, "q")] == ["auto-resume"]
    assert store.read_record("q")["restarts"] == 1 and store.read_record("q")["status"] == "finished"
    listing = cli("ls", "--runs-dir", str(store.root), cwd=tmp_path)
    assert "q  [finished]" in listing.stdout and "1 restart" in listing.stdout, listing.stdout
    status = cli("status", "q", "--runs-dir", str(store.root), cwd=tmp_path)
    assert "1 restart" in status.stdout, status.stdout

    # once more after it finished: exit 0 at once, one line, nothing written
    before = tree_digest(store.root)
    done = cli(*args, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "tui-trainer: q already finished at step 12; nothing to do\n")
    assert tree_digest(store.root) == before

    # a changed setting is never a silent continuation: exit 2, the key named
    changed = cli(*args, "--set", "optim.lr=0.5", cwd=tmp_path)
    assert changed.returncode == 2 and "optim.lr (0.001 -> 0.5)" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and tree_digest(store.root) == before


@pytest.mark.slow
async def test_the_app_marks_the_restart_step_on_the_plot(auto_resumed):
    """The run's files as the kill and the second run left them: the app's plot shows one curve to step 12
    and a ↻ at step 4, where the run continued by itself."""
    from support.app import fixed_probe, plot_ready, screen_text

    from tui_trainer.tui.app import TrainerApp
    from tui_trainer.tui.widgets.loss_plot import RESTART_GLYPH

    store = auto_resumed.store
    app = TrainerApp(store.root, probe=fixed_probe, strict=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        plot = app.main.plot
        assert plot.curves is not None and plot.curves.run == "q"
        assert plot.curves.restarts == [(4.0, "auto-resume")]
        assert list(plot.curves.loss.x) == sorted(set(plot.curves.loss.x))  # the lost steps 5-6 not twice
        plot.redraw()
        await pilot.pause()
        assert plot.drawn.get("restart") == 1
        screen = screen_text(app)
        assert f"{RESTART_GLYPH} restart" in screen  # the legend names it
        rows = screen.splitlines()
        axis = next(i for i, row in enumerate(rows) if "└──" in row and "┬" in row)
        labels = [word for word in rows[axis + 1].split() if word.isdigit()]
        ticks = dict(zip(labels, [i for i, ch in enumerate(rows[axis]) if ch == "┬"], strict=True))
        assert rows[axis - 1].find(RESTART_GLYPH) == ticks["4"], screen  # on the bottom row, over step 4's tick


@pytest.mark.slow
def test_sigusr1_saves_at_the_next_step_and_exits_0_then_auto_resume_continues_exactly(tmp_path, tiny):
    overrides = tiny(train__max_steps=12, checkpoint__every_steps=0, train__eval_every=0)
    expected, _ = in_process_reference(overrides)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--name", "s", "--auto-resume", "--headless", "--runs-dir", str(store.root), *sets(overrides)]
    run = Proc(args, tmp_path, faults_from="test_preemption:hold_at_step", env=held(tmp_path, 3))
    wait_for(lambda: (tmp_path / "held").exists() or not run.alive(), 90, "the run to reach step 3")
    os.kill(run.pid, signal.SIGUSR1)  # mid-step: it lands on this step's boundary
    wait_for(lambda: "SIGUSR1: pausing after step 3" in run.stderr or not run.alive(), 30, "the signal's line")
    (tmp_path / "release").touch()
    assert run.wait(60) == 0, run.stderr
    assert "Paused s at step 3 (checkpoint step 3 saved)" in run.stderr, run.stderr
    assert [c.step for c in store.run("s").checkpoints] == [3]

    again = cli(*args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert losses(store, "s") == expected


def test_auto_resume_needs_a_name_and_refuses_another_number_of_ranks(tmp_path, tiny):
    from tui_trainer.core.config import load_config
    from tui_trainer.core.errors import UserError
    from tui_trainer.core.plan import plan_auto_resume

    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny())
    with pytest.raises(UserError, match="--auto-resume needs --name"):
        plan_auto_resume(store, config, None)
    store.create_run("r", config.to_dict(), None)
    store.update_record("r", world_size=2)
    with pytest.raises(UserError, match=r"ranks \(2 -> 1\)"):
        plan_auto_resume(store, config, "r")


# ---------------------------------------------------------------- torchrun: elastic restarts, SIGUSR1 to every rank


def job_env(tmp_path: Path, step: int) -> dict[str, str]:
    """A torchrun job's environment: hold every rank at `step` (first start only), hooks importable."""
    from faults_support import ENV, TESTS

    path = os.pathsep.join(filter(None, [str(TESTS), ENV.get("PYTHONPATH", "")]))
    return {**held(tmp_path, step), faults.ENV_VAR: "test_preemption:hold_at_step", "PYTHONPATH": path}


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_job_continues_to_the_end_exactly(
    tmp_path,
    tiny,
    reference,  # noqa: F811 - test_ddp's fixture
):
    from test_ddp import Job, long_run, train_args

    store = RunStore(tmp_path / "runs")
    overrides = long_run(tiny, checkpoint__every_steps=4)  # checkpoints never change the losses
    elastic = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2"]
    job = Job(
        tmp_path, train_args(store, "R", overrides, "--until-step", "12"), torchrun=elastic, env=job_env(tmp_path, 6)
    )
    wait_for(lambda: (tmp_path / "held").exists() or job.popen.poll() is not None, 120, "the job to reach step 6")
    wait_for(lambda: newest_step(store, "R") == 4, 30, "checkpoint 4 on disk")
    os.kill(job.workers()[1], signal.SIGKILL)
    (tmp_path / "release").touch()  # rank 0 goes on, finds rank 1 gone at its next collective
    assert job.wait(timeout=240) == 0, job.stderr
    assert job.rank_codes() == {0: 0, 1: 0}
    assert "Traceback" not in job.stderr, job.stderr
    assert "elastic restart: continuing R from step 4" in job.stderr, job.stderr
    assert losses(store, "R") == {s: reference[s] for s in range(1, 13)}
    assert [m.get("reason") for m in markers(store, "R")] == ["elastic restart"]
    assert cli("verify", "R", "--runs-dir", str(store.root), cwd=tmp_path).returncode == 0
    listing = cli("ls", "--runs-dir", str(store.root), cwd=tmp_path).stdout
    assert "2 ranks  1 restart" in listing, listing


@pytest.mark.slow
def test_a_restart_of_another_torchrun_job_under_the_same_name_is_refused(tmp_path, tiny):
    from test_ddp import train_args

    store = RunStore(tmp_path / "runs")
    store.create_run("R", {}, None)
    store.update_record("R", launch={"torchelastic_run_id": "another-job"}, world_size=2)
    env = {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "this-job"}
    from tui_trainer.core.launch import elastic_restart_of

    assert not elastic_restart_of(store.read_record("R"), env)
    assert elastic_restart_of({"launch": {"torchelastic_run_id": "this-job"}}, env)
    assert not elastic_restart_of(
        {"launch": {"torchelastic_run_id": "this-job"}}, {**env, "TORCHELASTIC_RESTART_COUNT": "0"}
    )
    done = cli(*train_args(store, "R", tiny()), cwd=tmp_path)
    assert done.returncode == 2 and "run 'R' already exists" in done.stderr, done.stderr


@pytest.mark.slow
def test_sigusr1_to_every_rank_pauses_the_job_and_a_requeued_auto_resume_continues_it_exactly(
    tmp_path,
    tiny,
    reference,  # noqa: F811 - test_ddp's fixture
):
    """The README's Slurm recipe, as far as this machine goes: its torchrun line with --auto-resume under a
    fake Slurm environment; USR1 to every worker (what its trap does), then the requeued job's same line."""
    from test_ddp import Job, long_run, train_args

    store = RunStore(tmp_path / "runs")
    args = train_args(store, "S", long_run(tiny), "--auto-resume", "--until-step", "12")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}
    job = Job(tmp_path, args, env={**job_env(tmp_path, 5), **slurm})
    wait_for(lambda: (tmp_path / "held").exists() or job.popen.poll() is not None, 120, "the job to reach step 5")
    workers = job.workers()
    for pid in workers.values():
        os.kill(pid, signal.SIGUSR1)
    (tmp_path / "release").touch()
    assert job.wait(timeout=120) == 0, job.stderr
    assert job.rank_codes() == {0: 0, 1: 0}
    assert "rank 1: Paused S at step" in job.stderr and "SIGUSR1: pausing after step" in job.stderr, job.stderr
    paused = store.run("S").newest
    assert paused is not None and paused.step in (5, 6)  # the step each rank was in when USR1 landed
    assert store.read_record("S")["launch"]["slurm_job_id"] == "4242"

    requeued = Job(tmp_path, args, env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"})
    assert requeued.wait(timeout=120) == 0, requeued.stderr
    assert f"requeue: continuing S from step {paused.step}" in requeued.stderr, requeued.stderr
    assert losses(store, "S") == {s: reference[s] for s in range(1, 13)}
    assert [m.get("reason") for m in markers(store, "S")] == ["requeue"]
    assert store.read_record("S")["restarts"] == 1


def test_auto_resume_skips_an_invalid_newest_checkpoint_and_says_so(tmp_path, tiny):
    from tui_trainer.core.config import load_config
    from tui_trainer.core.plan import plan_auto_resume, plan_train
    from tui_trainer.engine.trainer import Trainer

    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(train__max_steps=12, checkpoint__every_steps=4))
    assert Trainer(store, plan_train(store, config, "r"), until_step=8).run() == "Paused"
    weights = store.checkpoint_dir("r", 8) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: the checksum no longer matches
    weights.write_bytes(bytes(data))
    plan = plan_auto_resume(store, config, "r")
    assert (plan.start_step, plan.restart) == (4, "auto-resume")
    assert any("skipping invalid checkpoint r@8" in note for note in plan.notes), plan.notes
    assert any("falling back to the newest valid checkpoint r@4" in note for note in plan.notes), plan.notes


# ---------------------------------------------------------------- the app follows the run across a restart


@pytest.mark.slow
async def test_an_attached_app_waits_for_the_restart_and_attaches_again(tmp_path, tiny):
    from support.app import fixed_probe
    from support.app import wait_for as wait_app

    from tui_trainer.control.live import connect_live
    from tui_trainer.control.protocol import LINK_NAME
    from tui_trainer.core.events import State
    from tui_trainer.tui.app import TrainerApp

    store = RunStore(tmp_path / "runs")
    overrides = tiny(train__max_steps=100_000, train__eval_every=0, checkpoint__every_steps=4)
    args = ["train", "--name", "a", "--auto-resume", "--headless", "--runs-dir", str(store.root), *sets(overrides)]
    link = store.run_dir("a") / LINK_NAME
    first = Proc(args, tmp_path)
    second = None
    try:
        wait_for(lambda: link.is_symlink() or not first.alive(), 90, "the socket link")
        app = TrainerApp(store.root, probe=fixed_probe, strict=True, remote=connect_live(store, "a"))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_app(pilot, lambda: newest_step(store, "a") >= 4, 90, "a checkpoint")
            os.kill(first.pid, signal.SIGKILL)
            text = lambda: app.main.status.text().plain  # noqa: E731
            await wait_app(pilot, lambda: "lost — waiting for a restart" in text(), 60, "the wait")
            second = Proc(args, tmp_path)  # the supervisor runs the same command again
            await wait_app(pilot, lambda: app.main.state == State.RUNNING, 90, "attached again")
            assert app.main.session.pid == second.pid  # the new process's channel
            resumed = markers(store, "a")[-1]
            assert resumed["reason"] == "auto-resume"
            curve = lambda: app.main.plot.curves.loss.x if app.main.plot.curves is not None else []  # noqa: E731
            await wait_app(pilot, lambda: len(curve()) and max(curve()) > resumed["step"] + 2, 60, "the curve")
            assert "lost" not in text(), text()
            # the curve goes on with a marker at the restart step (the history reloaded at the re-attach)
            assert app.main.plot.curves.restarts == [(resumed["step"], "auto-resume")]
            app.main.plot.redraw()
            assert app.main.plot.drawn.get("restart") == 1
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_run_restarts_itself_under_torchrun_with_restarts_left_or_with_auto_resume():
    from tui_trainer.core.launch import restarts_itself

    assert restarts_itself({"auto_resume": True})
    assert restarts_itself({"launch": {"torchelastic_run_id": "j", "torchelastic_max_restarts": "2"}})
    assert not restarts_itself({"launch": {"torchelastic_run_id": "j", "torchelastic_max_restarts": "0"}})
    assert not restarts_itself({"launch": {"slurm_job_id": "7"}})  # requeued only with --auto-resume
    assert not restarts_itself({})
    # a process that said it failed before exiting: torchrun restarts the job, a requeue is not owed
    assert restarts_itself({"launch": {"torchelastic_run_id": "j", "torchelastic_max_restarts": "2"}}, failed=True)
    assert not restarts_itself({"auto_resume": True}, failed=True)


# ---------------------------------------------------------------- end to end: the app in tmux across a restart


@pytest.mark.slow
def test_an_app_attached_in_tmux_to_an_elastic_run_survives_a_worker_kill(tmp_path, tiny):
    """`tui-trainer attach R` in a real terminal on a 2-rank torchrun job with restarts left; one worker is
    killed (-9) after checkpoint 4: the app says it waits for the restart, attaches to the restarted job by
    itself, and the curve goes on past the kill with a ↻ at step 4."""
    from support.tmux import TMUX, Pane
    from test_ddp import Job, long_run, train_args
    from test_e2e_tmux import status_line, status_step, tui_trainer_command

    from tui_trainer.tui.widgets.loss_plot import RESTART_GLYPH

    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    store = RunStore(tmp_path / "runs")
    overrides = long_run(tiny, train__max_steps=100_000, checkpoint__every_steps=4)
    elastic = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2"]
    job = Job(tmp_path, train_args(store, "R", overrides), torchrun=elastic, env=job_env(tmp_path, 6))
    pane = Pane(tmp_path)
    try:
        wait_for(lambda: (tmp_path / "held").exists() or job.popen.poll() is not None, 120, "the job to reach step 6")
        wait_for(lambda: newest_step(store, "R") == 4, 30, "checkpoint 4 on disk")
        pane.start([*tui_trainer_command(), "attach", "R", "--runs-dir", str(store.root)])
        pane.wait_for(lambda s: "Detach" in s and "━━ train" in s and "Running" in status_line(s), 60)
        first = job.workers()
        os.kill(first[1], signal.SIGKILL)
        (tmp_path / "release").touch()  # rank 0 goes on, finds rank 1 gone at its next collective
        # rank 0 finds its peer gone and says the job failed; torchrun restarts both ranks
        pane.wait_for("R failed — waiting for a restart", 60)
        # attached again: the restarted job's steps come in (the first job never passed step 7)
        pane.wait_for(lambda s: status_step(s) > 8 and "lost" not in s, 120)
        screen = pane.wait_for(lambda s: f"{RESTART_GLYPH} restart" in s, 10)  # the plot's next redraw
        canvas = [row for row in screen.splitlines() if RESTART_GLYPH in row and "restart" not in row]
        assert canvas, screen  # the mark on the plot, besides its name in the legend
        assert "Running" in status_line(screen), screen
        assert [m.get("reason") for m in markers(store, "R")] == ["elastic restart"]
    finally:
        pane.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.popen.pid, signal.SIGKILL)
        job.popen.wait(30)

"""Data-parallel training under torchrun, for real: 2 gloo ranks on the CPU, tiny models.

Every launch goes through a small script that records each worker's exit code, so "every rank exited 0"
is checked, not inferred from torchrun (which exits 1 with its own traceback whenever it is signalled).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from faults_support import ENV, losses, metric_lines, sets
from safetensors.torch import load_file
from support import procs
from support.waiting import wait_for
from transformers.trainer_pt_utils import safe_globals

from tui_trainer.core.config import load_config
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

pytestmark = pytest.mark.slow

LAUNCHER = """import os, sys
from tui_trainer.cli import main
rc = main(sys.argv[1:])
with open(os.path.join(os.environ["RC_DIR"], "rc-" + os.environ["RANK"]), "w") as fh:
    fh.write(str(rc))
sys.exit(rc)
"""


class Job:
    """One torchrun launch of `tui-trainer ARGS` in the background (its own process group)."""

    def __init__(
        self,
        tmp: Path,
        args: list[str],
        *,
        nproc: int = 2,
        torchrun: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(tmp) / f"job-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        script = self.dir / "launch.py"
        script.write_text(LAUNCHER)
        launch = torchrun or ["--standalone", "--nproc-per-node", str(nproc)]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(script), "--", *args]
        self.err = self.dir / "stderr.txt"
        with open(self.err, "wb") as err:
            self.popen = procs.popen(  # a session of its own: the group signals reach torchrun and workers only
                cmd,
                cwd=tmp,
                env={**ENV, **(env or {}), "RC_DIR": str(self.dir)},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        return self.popen.wait(timeout=timeout)

    def rank_codes(self) -> dict[int, int]:
        return {int(p.name[3:]): int(p.read_text()) for p in self.dir.glob("rc-*")}

    def workers(self) -> dict[int, int]:
        """rank -> pid of this job's worker processes."""
        out = {}
        for child in psutil.Process(self.popen.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                out[int(rank)] = child.pid
        return out


def long_run(tiny, **extra) -> list[str]:
    """A schedule far longer than any test (until-step or a signal ends it), dropout on, 2 micro-batches."""
    settings = {"train__max_steps": 2000, "train__eval_every": 0, "train__grad_accum": 2, "checkpoint__every_steps": 0}
    return tiny(**{**settings, **extra})


def train_args(store: RunStore, name: str, overrides: list[str], *more: str) -> list[str]:
    return ["train", "--name", name, "--headless", "--runs-dir", str(store.root), *sets(overrides), *more]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """Losses of an uninterrupted 2-rank run of `long_run` to step 16, launched with `--nproc 2`."""
    from conftest import tiny_overrides

    tmp = tmp_path_factory.mktemp("ddp-reference")
    store = RunStore(tmp / "runs")
    args = train_args(store, "ref", long_run(lambda **e: tiny_overrides(small_corpus, **e)), "--until-step", "16")
    done = subprocess.run(
        [sys.executable, "-m", "tui_trainer", *args, "--nproc", "2"],
        cwd=tmp,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "Running ref (2 ranks (gloo), effective batch 16 = 4 x 2 x 2)" in done.stderr, done.stderr
    record = store.read_record("ref")
    assert (record["world_size"], record["effective_batch"]) == (2, 16)
    got = losses(store, "ref")
    assert sorted(got) == list(range(1, 17))
    return got


def last_logged(store: RunStore, run: str) -> int:
    steps = [r["step"] for r in metric_lines(store.metrics_path(run)) if "loss" in r]
    return steps[-1] if steps else 0


def resume_continues_exactly(tmp: Path, store: RunStore, run: str, reference: dict[int, float]) -> None:
    start = store.run(run).newest.step
    until = min(16, start + 2)
    job = Job(tmp, ["resume", run, "--headless", "--runs-dir", str(store.root), "--until-step", str(until)])
    assert job.wait() == 0, job.stderr
    got = losses(store, run)
    assert got == {s: reference[s] for s in range(1, until + 1)}


def test_a_paused_and_resumed_two_rank_run_repeats_the_uninterrupted_losses_bit_for_bit(tmp_path, tiny, reference):
    store = RunStore(tmp_path / "runs")
    job = Job(tmp_path, train_args(store, "r", long_run(tiny), "--until-step", "6"))
    assert job.wait() == 0, job.stderr
    assert job.rank_codes() == {0: 0, 1: 0}
    # --until-step lands on the same step on both ranks, and rank 0 saved exactly that step
    assert "rank 1: Paused r at step 6" in job.stderr and "Paused r at step 6 (checkpoint step 6 saved)" in job.stderr
    assert [c.step for c in store.run("r").checkpoints] == [6]
    rng = torch.load(store.checkpoint_dir("r", 6) / "rng.pt", weights_only=True)
    assert isinstance(rng, list) and len(rng) == 2  # every rank's dropout stream, covered by the manifest
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # and in HF Trainer's per-rank files, which is what its _load_rng_state reads on rank N of 2
    ckpt = store.checkpoint_dir("r", 6)
    assert not (ckpt / "rng_state.pth").exists()
    with safe_globals():
        hf = [torch.load(ckpt / f"rng_state_{rank}.pth", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(hf[rank]["cpu"], rng[rank]["torch"]) for rank in (0, 1))
    assert "rng_state_1.pth" in json.loads((ckpt / "manifest.json").read_text())["files"]
    job = Job(tmp_path, ["resume", "r", "--headless", "--runs-dir", str(store.root), "--until-step", "12"])
    assert job.wait() == 0, job.stderr
    assert losses(store, "r") == {s: reference[s] for s in range(1, 13)}


def test_two_ranks_at_batch_4_train_like_one_process_at_batch_8(tmp_path, tiny, family_dirs):
    """On the tiny pretrained Llama with LoRA (the common case: not GPT-2, frozen base parameters inside DDP;
    every other test here trains GPT-2): the adapters two ranks train are one process's at twice the batch."""
    settings = tiny(
        model__pretrained=str(family_dirs["llama"]),
        lora__r=4,
        lora__dropout=0.0,
        model__dropout=0.0,
        train__max_steps=20,
        train__grad_accum=2,
        train__eval_every=0,
        checkpoint__every_steps=0,
    )
    store = RunStore(tmp_path / "runs")
    job = Job(tmp_path, train_args(store, "ddp", settings))
    assert job.wait() == 0, job.stderr
    one = [s.replace("train.batch_size=4", "train.batch_size=8") for s in settings]
    assert Trainer(store, plan_train(store, load_config(None, one), "one")).run() == "Finished"
    ddp, single = losses(store, "ddp"), losses(store, "one")
    assert sorted(ddp) == sorted(single) == list(range(1, 21))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), step
    a = load_file(str(store.checkpoint_dir("ddp", 20) / "adapter_model.safetensors"))
    b = load_file(str(store.checkpoint_dir("one", 20) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _sigterm_torchrun(job: Job) -> None:
    os.kill(job.popen.pid, signal.SIGTERM)


def _sigterm_group(job: Job) -> None:
    os.killpg(job.popen.pid, signal.SIGTERM)


@pytest.mark.parametrize("send", [_sigterm_torchrun, _sigterm_group], ids=["torchrun", "process-group"])
def test_sigterm_mid_run_saves_one_checkpoint_and_every_rank_exits_0(tmp_path, tiny, reference, send):
    store = RunStore(tmp_path / "runs")
    job = Job(tmp_path, train_args(store, "t", long_run(tiny)))
    wait_for(lambda: last_logged(store, "t") >= 3 or job.popen.poll() is not None, 120, "step 3")
    send(job)
    # torchrun itself exits 1 (its SignalException traceback) even though every worker exited 0
    assert job.wait() == 1
    assert job.rank_codes() == {0: 0, 1: 0}, job.stderr
    said = re.search(r"Paused t at step (\d+) \(checkpoint step (\d+) saved\)", job.stderr)
    assert said and said.group(1) == said.group(2), job.stderr
    step = int(said.group(1))
    assert f"rank 1: Paused t at step {step}" in job.stderr
    assert [c.step for c in store.run("t").checkpoints] == [step]
    verify_checkpoint(store.checkpoint_dir("t", step))
    if send is _sigterm_torchrun and step < 16:  # one resume is enough to show the state is whole
        resume_continues_exactly(tmp_path, store, "t", reference)


def test_a_pause_on_rank_0_alone_lands_on_the_same_step_on_both_ranks(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    job = Job(tmp_path, train_args(store, "p", long_run(tiny)))
    wait_for(lambda: last_logged(store, "p") >= 2 or job.popen.poll() is not None, 120, "step 2")
    os.kill(job.workers()[0], signal.SIGTERM)  # the handler calls trainer.pause() on rank 0 only
    assert job.wait() == 0, job.stderr
    assert job.rank_codes() == {0: 0, 1: 0}
    promised = int(re.search(r"SIGTERM: pausing after step (\d+)", job.stderr).group(1))
    assert f"Paused p at step {promised} (checkpoint step {promised} saved)" in job.stderr
    assert f"rank 1: Paused p at step {promised}" in job.stderr
    assert [c.step for c in store.run("p").checkpoints] == [promised]


def test_kill_9_of_one_worker_ends_the_job_within_60s_and_loses_nothing(tmp_path, tiny, reference):
    store = RunStore(tmp_path / "runs")
    job = Job(tmp_path, train_args(store, "k", long_run(tiny, checkpoint__every_steps=2)))
    wait_for(lambda: last_logged(store, "k") >= 5 or job.popen.poll() is not None, 120, "step 5")
    os.kill(job.workers()[1], signal.SIGKILL)
    killed = time.monotonic()
    assert job.wait(timeout=90) != 0
    assert time.monotonic() - killed < 60
    checkpoints = store.run("k").checkpoints
    assert checkpoints and all(c.valid for c in checkpoints)
    for c in checkpoints:
        verify_checkpoint(c.path)
    resume_continues_exactly(tmp_path, store, "k", reference)


def nan_on_rank_1() -> object:
    """TUI_TRAINER_FAULTS factory: rank 1's loss turns NaN from its 9th forward (step 5, grad_accum=2)."""
    from tui_trainer.engine import faults

    def nan(n: int, out: object) -> object:
        if n >= 9:
            out["loss"] = out["loss"] * float("nan")  # type: ignore[index]
        return out

    return faults.Hooks(after_forward=nan) if os.environ.get("RANK") == "1" else faults.NO_HOOKS


def test_a_nan_on_one_rank_stops_every_rank_on_the_same_step_before_any_save(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    # logged every 4 steps: the NaN of step 5 is found by the boundary vote, not by a log line
    overrides = long_run(tiny, train__log_every=4, checkpoint__every_steps=2)
    env = {"TUI_TRAINER_FAULTS": "test_ddp:nan_on_rank_1", "PYTHONPATH": str(Path(__file__).parent)}
    job = Job(tmp_path, train_args(store, "nan", overrides), env=env)
    assert job.wait() == 1, job.stderr
    assert job.rank_codes() == {0: 1, 1: 1}, job.stderr
    at = "the loss on at least one rank is NaN or Inf at or before step 5"
    assert f"error at step 5: {at}" in job.stderr and f"rank 1: error at step 5: {at}" in job.stderr, job.stderr
    assert [c.step for c in store.run("nan").checkpoints] == [2, 4]  # nothing of the diverged state
    assert store.read_record("nan")["status"] == "paused"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_localhost_train_together_and_checkpoint_once(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    port = _free_port()
    args = train_args(store, "n", long_run(tiny), "--until-step", "4")

    def node(rank: int) -> Job:
        launch = ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        return Job(tmp_path, args, torchrun=[*launch, "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"])

    nodes = [node(0), node(1)]
    assert [n.wait() for n in nodes] == [0, 0], [n.stderr for n in nodes]
    assert store.read_record("n")["world_size"] == 2
    assert [c.step for c in store.run("n").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("n", 4))

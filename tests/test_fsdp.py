"""FSDP2 with sharded (DCP) checkpoints, for real: 2 gloo ranks on the CPU under torchrun, tiny models.

One module-scoped set of runs (`runs`) serves every test, so the whole module launches torchrun eight times:
- ref  (dropout on) 2 ranks to step 10, blocking saves at 4 and 8;  r: the same with background saves (the
       one of step 4 held back on rank 1 until step 5 is trained), paused at 6, then resumed on 2 ranks to 10
- ref0 (dropout 0)  2 ranks to step 10 (its training model's logits at step 10 kept for the export test)
- g0   2 ranks, killed -9 in the save of step 8 (rank 1, before its shards), continued on 1 process to 10
- h0   1 process to 6 (batch 8: the same global batch), continued on 2 ranks and killed -9 in the save of
       step 10 (rank 0, after every rank's shards, before the manifest), then resumed on 2 ranks to 10; with
       checkpoint.hf_weights, so each of its checkpoints also holds an HF-loadable model.safetensors
- x    1 process, DDP's full format, to 6; its step 4 branched into FSDP on 2 ranks (xf); and ref0@10's
       shards branched into a plain 1-process run (back)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from faults_support import ENV, losses, metric_lines, sets
from test_ddp import Job

from tui_trainer.core.config import load_config
from tui_trainer.core.errors import ConfigError
from tui_trainer.core.plan import plan_branch, plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
LOGITS_ENV = "TUI_TEST_LOGITS"  # where fsdp_logits_at_10 writes the training model's logits
KILL_ENV = "TUI_TEST_KILL"  # "RANK:STEP:FILE": that rank kills itself -9 before writing FILE of checkpoint STEP
HOLD_ENV = "TUI_TEST_HOLD"  # "STEP": rank 1 holds its shard write of checkpoint STEP until STEP + 1 is trained


def fixed_batch() -> torch.Tensor:
    return torch.arange(64).remainder(300).view(2, 32)


def fsdp_logits_at_10() -> object:
    """TUI_TRAINER_FAULTS factory: after step 10 every rank runs the FSDP model on a fixed batch (its
    forward is collective) and rank 0 keeps the logits, which the export must reproduce."""
    from tui_trainer.engine import faults

    def after_step(step: int, model: torch.nn.Module) -> None:
        if step == 10:
            with torch.no_grad():
                logits = model(input_ids=fixed_batch()).logits
            if os.environ["RANK"] == "0":
                torch.save(logits, os.environ[LOGITS_ENV])

    return faults.Hooks(after_optimizer_step=after_step)


def step_of(path: Path) -> int:
    """The checkpoint step a file being written belongs to: the hidden dir it is written into names it (a
    save's shard dir, or the checkpoint's temp dir). A background shard write may come after the next save
    was asked for, so the step of the save in progress would not say."""
    return int(path.parent.name.split("step-")[1].split("-")[0])


def kill_in_save() -> object:
    """TUI_TRAINER_FAULTS factory: the rank named by $TUI_TEST_KILL dies by SIGKILL just before it writes
    the named file of the named checkpoint step (a shard's name is `__RANK_0.distcp`)."""
    import signal

    from tui_trainer.engine import faults

    rank, step, name = os.environ[KILL_ENV].split(":")

    def before_file(path: Path) -> None:
        if path.name == name and step_of(path) == int(step):
            os.kill(os.getpid(), signal.SIGKILL)

    return faults.Hooks(before_checkpoint_file=before_file) if os.environ["RANK"] == rank else faults.NO_HOOKS


def hold_shard_write() -> object:
    """TUI_TRAINER_FAULTS factory: rank 1 holds its shard write of checkpoint $TUI_TEST_HOLD back until its
    training thread has trained the next step. A save that stalls training never gets there: the hold
    gives up after two minutes and fails the save (so the run), naming why."""
    import threading

    from tui_trainer.engine import faults

    step = int(os.environ[HOLD_ENV])
    trained = threading.Event()

    def after_step(at: int, model: torch.nn.Module) -> None:
        if at == step + 1:
            trained.set()

    def before_file(path: Path) -> None:
        if path.name == "__1_0.distcp" and step_of(path) == step:
            if not trained.wait(timeout=120):
                raise RuntimeError(f"step {step + 1} was not trained while the shards of step {step} were held")
            print(f"[hold] step {step + 1} trained while the shards of step {step} were held", file=sys.stderr)

    hooks = faults.Hooks(after_optimizer_step=after_step, before_checkpoint_file=before_file)
    return hooks if os.environ["RANK"] == "1" else faults.NO_HOOKS


def fsdp_overrides(corpus: Path, **extra: object) -> list[str]:
    from conftest import tiny_overrides

    settings = {
        "model__n_layer": 2,  # two blocks, each its own FSDP unit, and the root
        "train__parallel": "fsdp",
        "train__max_steps": 2000,
        "train__eval_every": 0,
        "train__grad_accum": 2,  # the first micro-batch's backward does not reduce (set_requires_gradient_sync)
        "checkpoint__every_steps": 0,
    }
    return tiny_overrides(corpus, **{**settings, **extra})


def launch(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> Job:
    path = os.pathsep.join(filter(None, [str(TESTS), ENV.get("PYTHONPATH", "")]))
    return Job(tmp, args, env={**(env or {}), "PYTHONPATH": path})


def train(store: RunStore, name: str, overrides: list[str], until: int) -> list[str]:
    return [
        "train",
        "--name",
        name,
        "--headless",
        "--runs-dir",
        str(store.root),
        *sets(overrides),
        "--until-step",
        str(until),
    ]


def resume(store: RunStore, name: str, until: int) -> list[str]:
    return ["resume", name, "--headless", "--runs-dir", str(store.root), "--until-step", str(until)]


def logged_since_last_start(store: RunStore, run: str) -> dict[int, float]:
    """The losses the latest process of `run` logged (after its resume marker), as written."""
    lines = metric_lines(store.metrics_path(run))
    starts = [i for i, r in enumerate(lines) if r.get("event") == "resume"]
    return {r["step"]: r["loss"] for r in lines[(starts[-1] if starts else 0) :] if "loss" in r}


def weights(store: RunStore, run: str, step: int) -> dict[str, torch.Tensor]:
    from tui_trainer.engine.sharded_checkpoint import load_model

    verify_checkpoint(store.checkpoint_dir(run, step))
    return load_model(store.checkpoint_dir(run, step)).state_dict()


def checkpoint_steps(store: RunStore, run: str) -> list[int]:
    return [c.step for c in store.run(run).checkpoints]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("fsdp")
    store = RunStore(tmp / "runs")
    out: dict[str, object] = {"store": store, "tmp": tmp}

    def ok(job: Job) -> Job:
        assert job.wait(timeout=180) == 0, job.stderr
        assert job.rank_codes() == {0: 0, 1: 0}, job.stderr
        return job

    def killed(job: Job) -> dict[str, object]:
        code = job.wait(timeout=180)
        run = "g0" if "g0" in job.popen.args else "h0"
        return {
            "code": code,
            "stderr": job.stderr,
            "checkpoints": checkpoint_steps(store, run),
            "valid": [c.valid for c in store.run(run).checkpoints],
            "logged": logged_since_last_start(store, run),
        }

    dropout = fsdp_overrides(small_corpus)
    still = fsdp_overrides(small_corpus, model__dropout=0.0)
    # ref saves at 4 and 8 on the training thread; r in the background (its own checkpoints: 4 held, 6, 8, 10)
    blocking = [*dropout, "checkpoint.every_steps=4", "checkpoint.async_save=false"]
    out["ref"] = ok(launch(tmp, train(store, "ref", blocking, 10)))
    hold = {"TUI_TRAINER_FAULTS": "test_fsdp:hold_shard_write", HOLD_ENV: "4"}
    out["r-paused"] = ok(launch(tmp, train(store, "r", [*dropout, "checkpoint.every_steps=4"], 6), hold))
    out["r-ckpt6"] = sorted(p.name for p in store.checkpoint_dir("r", 6).iterdir())
    out["r-weights4"] = weights(store, "r", 4)  # retention drops r@4 once r has saved 8 and 10
    out["r-resumed"] = ok(launch(tmp, resume(store, "r", 10)))

    logits = tmp / "logits.pt"
    env = {"TUI_TRAINER_FAULTS": "test_fsdp:fsdp_logits_at_10", LOGITS_ENV: str(logits)}
    out["ref0"] = ok(launch(tmp, train(store, "ref0", still, 10), env))
    out["logits"] = torch.load(logits, weights_only=True)

    # g0: 2 ranks, a checkpoint every 2 steps; rank 1 is killed -9 just before it writes its shards of step 8
    kill = {"TUI_TRAINER_FAULTS": "test_fsdp:kill_in_save", KILL_ENV: "1:8:__1_0.distcp"}
    out["g0-killed"] = killed(launch(tmp, train(store, "g0", [*still, "checkpoint.every_steps=2"], 10), kill))
    out["g0-one"] = Trainer(store, plan_resume(store, "g0"), until_step=10).run()
    out["g0-after"] = (checkpoint_steps(store, "g0"), losses(store, "g0"))  # before its later continuation

    # h0: one process at batch 8 = two ranks at batch 4, to step 6; continued on 2 ranks, where rank 0 is
    # killed -9 after every rank's shards of step 10 are on disk, just before the manifest
    one = [s.replace("train.batch_size=4", "train.batch_size=8") for s in still]
    one += ["checkpoint.every_steps=2"]
    h0 = [*one, "checkpoint.hf_weights=true"]  # each sharded checkpoint also gets an HF model.safetensors
    out["h0-one"] = Trainer(store, plan_train(store, load_config(None, h0), "h0"), until_step=6).run()
    out["h0-before"] = checkpoint_steps(store, "h0")
    kill = {"TUI_TRAINER_FAULTS": "test_fsdp:kill_in_save", KILL_ENV: "0:10:manifest.json"}
    out["h0-killed"] = killed(launch(tmp, resume(store, "h0", 10), kill))
    out["h0-final"] = ok(launch(tmp, resume(store, "h0", 10)))

    # x: a full (DDP-format) one-process checkpoint at step 4, branched into FSDP on 2 ranks; and back: a
    # sharded checkpoint of 2 ranks branched into a plain one-process run (full checkpoints again)
    x = [*one, "train.parallel=ddp", "checkpoint.every_steps=4"]
    out["x"] = Trainer(store, plan_train(store, load_config(None, x), "x"), until_step=6).run()
    fsdp_branch = ["branch", "x@4", "--name", "xf", "--set", "train.parallel=fsdp", "--headless"]
    out["xf"] = ok(launch(tmp, [*fsdp_branch, "--runs-dir", str(store.root), "--until-step", "6"]))
    back = plan_branch(store, "ref0@10", "back", ["train.parallel=ddp", "train.batch_size=8"])
    out["back"] = Trainer(store, back, until_step=12).run()
    out["g0-12"] = Trainer(store, plan_resume(store, "g0"), until_step=12).run()
    return out


def test_a_paused_and_resumed_fsdp_run_repeats_the_uninterrupted_losses_bit_for_bit(runs):
    store = runs["store"]
    assert "Running ref (2 ranks (FSDP, gloo), effective batch 16 = 4 x 2 x 2)" in runs["ref"].stderr
    assert "Paused r at step 6 (checkpoint step 6 saved)" in runs["r-paused"].stderr
    reference = losses(store, "ref")
    assert sorted(reference) == list(range(1, 11))
    assert losses(store, "r") == reference  # dropout on: each rank's RNG restored exactly
    # every rank wrote its own shards, rank 0 the rest; the manifest covers them all and says "sharded"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json", "rng.pt"} <= set(runs["r-ckpt6"])
    assert "model.safetensors" not in runs["r-ckpt6"] and "optimizer.pt" not in runs["r-ckpt6"]
    manifest = verify_checkpoint(store.checkpoint_dir("r", 6))
    assert manifest["sharded"] == {"world_size": 2}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])


def test_a_background_sharded_save_lets_training_go_on_and_holds_the_state_of_its_own_step(runs):
    store = runs["store"]
    # rank 1's shards of step 4 were held back until it had trained step 5: the save did not stall training
    assert "[hold] step 5 trained while the shards of step 4 were held" in runs["r-paused"].stderr
    # ... and still hold step 4's state (staged off the live tensors), bit for bit what a blocking save wrote
    held, blocking = runs["r-weights4"], weights(store, "ref", 4)
    assert held.keys() == blocking.keys()
    for name in held:
        assert torch.equal(held[name], blocking[name]), name
    # the pause waited for it and then wrote step 6; the resumed run saved 8 in the background, 10 at the end
    assert checkpoint_steps(store, "r") == [6, 8, 10]
    assert not [p for p in store.checkpoints_dir("r").iterdir() if p.name.startswith(".")]


def test_ls_and_verify_name_a_sharded_checkpoint_and_the_ranks_that_wrote_it(runs, capsys):
    from tui_trainer.cli import main

    root = str(runs["store"].root)
    assert main(["ls", "--runs-dir", root, "--json"]) == 0
    listed = {run["name"]: run for run in json.loads(capsys.readouterr().out)}
    assert [c["sharded"] for c in listed["r"]["checkpoints"]] == [2, 2, 2]
    assert {c["sharded"] for c in listed["g0"]["checkpoints"]} == {1}  # continued on one process
    assert {c["sharded"] for c in listed["x"]["checkpoints"]} == {None}  # full checkpoints
    assert main(["ls", "--runs-dir", root]) == 0
    assert "sharded (2 ranks)" in capsys.readouterr().out
    assert main(["verify", "r", "--runs-dir", root]) == 0
    assert "ok       r@6" in capsys.readouterr().out


def test_kill_9_of_rank_1_before_its_shards_leaves_no_checkpoint_and_the_run_continues_on_one_process(runs):
    store = runs["store"]
    killed = runs["g0-killed"]
    # the job ends; no step-8 checkpoint, not even an invalid one (its temp dir is hidden, then cleaned); the
    # shards of step 8 are written in the background, so rank 0 may train on a step or two before it notices
    assert killed["code"] != 0 and killed["checkpoints"] == [2, 4, 6], killed["stderr"]
    assert all(killed["valid"]) and set(range(1, 9)) <= set(killed["logged"]) <= set(range(1, 11))
    # the newest valid checkpoint (6, written by 2 ranks) continues on one process: the same run, no branch
    assert runs["g0-one"] == "Paused"
    steps, got = runs["g0-after"]
    assert store.run("g0").parent is None and steps == [6, 8, 10]
    reference = losses(store, "ref0")
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(reference[step], abs=1e-3), step
    assert verify_checkpoint(store.checkpoint_dir("g0", 10))["sharded"] == {"world_size": 1}
    assert not [p for p in store.checkpoints_dir("g0").iterdir() if p.name.startswith(".")]  # temp dir cleaned


def test_a_one_process_checkpoint_continues_on_two_ranks_and_a_kill_before_the_manifest_loses_nothing(runs):
    store = runs["store"]
    assert runs["h0-one"] == "Paused" and runs["h0-before"] == [2, 4, 6]
    killed = runs["h0-killed"]
    assert "continuing h0 on 2 rank(s) (it ran on 1): same global batch" in killed["stderr"]
    # rank 0 killed after every rank's shards of step 10 were on disk, before the manifest: 8 landed, 10 did
    # not (retention keeps the newest 3)
    assert killed["code"] != 0 and killed["checkpoints"] == [4, 6, 8] and all(killed["valid"]), killed["stderr"]
    assert sorted(killed["logged"]) == [7, 8, 9, 10]
    # the newest valid checkpoint (8) resumes exactly: steps 9 and 10 again, bit for bit
    assert logged_since_last_start(store, "h0") == {9: killed["logged"][9], 10: killed["logged"][10]}
    for ckpt in store.run("h0").checkpoints:
        verify_checkpoint(ckpt.path)
    assert not [p for p in store.checkpoints_dir("h0").iterdir() if p.name.startswith(".")]  # temp dir cleaned
    # one process at batch 8 to step 6, then two ranks at batch 4: the run two ranks make from the start
    got, reference = losses(store, "h0"), losses(store, "ref0")
    assert sorted(got) == list(range(1, 11))
    for step in got:
        assert got[step] == pytest.approx(reference[step], abs=1e-3), step
    assert store.read_record("h0")["world_size"] == 2


def test_hf_weights_in_a_sharded_checkpoint_load_in_transformers_and_the_shards_still_resume(runs):
    from transformers import AutoModelForCausalLM

    from tui_trainer.engine.sharded_checkpoint import is_sharded_checkpoint, load_model

    store = runs["store"]
    for ckpt in store.run("h0").checkpoints:  # written by 1 process (4, 6) and by 2 ranks (8, 10)
        manifest = verify_checkpoint(ckpt.path, deep=True)
        assert "model.safetensors" in manifest["files"] and is_sharded_checkpoint(ckpt.path), ckpt.step
        assert "optimizer.pt" not in manifest["files"]  # AdamW's state stays in the shards
    path = store.checkpoint_dir("h0", 10)
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # what an HF script does with the dir
    with torch.no_grad():
        logits = model(input_ids=fixed_batch()).logits
        torch.testing.assert_close(logits, load_model(path).eval()(input_ids=fixed_batch()).logits, rtol=0, atol=0)
    # and the checkpoints resumed from (6 on 2 ranks, 8 after the kill) were read as sharded, AdamW state and
    # all: steps 9 and 10 repeated bit for bit (the test above; read as full ones, the resume fails)


def test_a_full_checkpoint_branches_into_fsdp_and_a_sharded_one_into_a_plain_run(runs):
    store = runs["store"]
    assert runs["x"] == "Paused" and runs["back"] == runs["g0-12"] == "Paused"
    assert (store.checkpoint_dir("x", 4) / "model.safetensors").is_file()  # the full format
    # x@4 into FSDP's shards on 2 ranks (each keeps its shard of the full weights and AdamW state)
    assert "Running xf from step 4 (2 ranks (FSDP, gloo), effective batch 16 = 4 x 2 x 2)" in runs["xf"].stderr
    plain, sharded = losses(store, "x"), losses(store, "xf")
    assert sorted(sharded) == [5, 6]
    for step in (5, 6):
        assert sharded[step] == pytest.approx(plain[step], abs=1e-3), step
    assert verify_checkpoint(store.checkpoint_dir("xf", 6))["sharded"] == {"world_size": 2}
    # ref0@10 (2 ranks' shards) into a plain one-process run: steps 11 and 12 as g0 (FSDP, 1 process) takes them
    back, g0 = losses(store, "back"), losses(store, "g0")
    for step in (11, 12):
        assert back[step] == pytest.approx(g0[step], abs=1e-3), step
    assert (store.checkpoint_dir("back", 12) / "model.safetensors").is_file()
    assert "sharded" not in verify_checkpoint(store.checkpoint_dir("back", 12))


def test_export_of_a_sharded_checkpoint_loads_in_transformers_with_the_training_models_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tui_trainer.engine.export import export_checkpoint

    store = runs["store"]
    target = tmp_path / "export"
    export_checkpoint(store, "ref0@10", target)
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.distcp"))
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    with torch.no_grad():
        logits = model(input_ids=fixed_batch()).logits
    torch.testing.assert_close(logits, runs["logits"], rtol=0, atol=1e-5)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_naming_it(runs):
    from tui_trainer.engine.run_setup import rank_batch

    store = runs["store"]
    saved = json.loads((store.checkpoint_dir("ref0", 10) / "tui_trainer_state.json").read_text())
    train_cfg = load_config(None, ["train.grad_accum=2"]).train
    assert [rank_batch(train_cfg, saved, world) for world in (1, 2, 4)] == [8, 4, 2]
    with pytest.raises(ConfigError, match="global batch of 16 sequences does not split over 3 rank"):
        rank_batch(train_cfg, saved, 3)


def test_generate_reads_a_sharded_checkpoint(runs):
    from tui_trainer.engine.generate import generate_text

    text = generate_text(runs["store"].checkpoint_dir("ref0", 10), "To be", max_new_tokens=5, seed=1)
    assert text.startswith("To be") and len(text) > len("To be")


class _Planted:
    """A payload a planted .metadata would run if it were unpickled plainly."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PLANTED",))


def test_a_planted_shard_index_is_refused_in_one_line_and_never_run(runs, tmp_path, monkeypatch, capsys):
    import pickle
    import shutil

    from tui_trainer.cli import main
    from tui_trainer.core.store import MANIFEST, write_manifest

    monkeypatch.chdir(tmp_path)
    store = RunStore(tmp_path / "runs")
    shutil.copytree(runs["store"].run_dir("ref0"), store.run_dir("ref0"))
    ckpt = store.checkpoint_dir("ref0", 10)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Planted()))
    meta = {k: v for k, v in json.loads((ckpt / MANIFEST).read_text()).items() if k not in ("format", "files")}
    write_manifest(ckpt, meta)  # what an attacker does after editing a file: a manifest that matches again
    for args in (["export", "ref0@10", str(tmp_path / "out")], ["generate", "ref0", "--max-new-tokens", "2"]):
        capsys.readouterr()
        assert main([*args, "--runs-dir", str(store.root)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ".metadata: refused to load" in err and "is not part of" in err, err
    assert not (tmp_path / "PLANTED").exists() and not (tmp_path / "out").exists()


class _AsGetattr:
    """Pickles as getattr(target, name): how Python 3.11.0-3.11.4 pickles an Enum member (DCP's index has some)."""

    def __init__(self, target: object, name: str) -> None:
        self.target, self.name = target, name

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (getattr, (self.target, self.name))


def test_the_shard_index_reader_takes_an_enum_member_pickled_as_getattr_and_no_other_attribute(tmp_path):
    import pathlib
    import pickle

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from tui_trainer.core.errors import CheckpointInvalid
    from tui_trainer.engine.shard_index import read_index

    member = next(iter(_MEM_FORMAT_ENCODING))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_AsGetattr(_MEM_FORMAT_ENCODING, member.name)))
    with pytest.raises(CheckpointInvalid, match=r"not a checkpoint index$"):  # read back as the member: not refused
        read_index(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_AsGetattr(pathlib.PosixPath, "home")))
    with pytest.raises(CheckpointInvalid, match=r"refused to load .*getattr"):
        read_index(tmp_path)


def test_auto_resume_continues_an_fsdp_run_on_another_number_of_ranks_and_refuses_ddp(runs):
    from tui_trainer.core.config import Config
    from tui_trainer.core.errors import UserError
    from tui_trainer.core.plan import plan_auto_resume

    store = runs["store"]
    config = Config.from_dict(store.run("r").config)
    plan = plan_auto_resume(store, config, "r", world_size=1)  # r ran on 2
    assert not plan.new_run and plan.start == store.checkpoint_dir("r", 10)
    assert "continuing r on 1 rank(s) (it ran on 2): same global batch" in plan.notes
    x = Config.from_dict(store.run("x").config)  # ddp, one process: two ranks change the effective batch
    with pytest.raises(UserError, match=r"ranks \(1 -> 2\)"):
        plan_auto_resume(store, x, "x", world_size=2)


def test_a_failed_background_shard_write_pauses_the_run_as_a_failed_save_does_and_loses_nothing(tmp_path, small_corpus):
    """One process (FSDP's format, DCP's async path without a process group): the shard write of step 4
    fails (ENOSPC injected on the background thread) while training goes on. The run pauses with the disk
    fault a failed checkpoint save gives, step 2 stays the newest checkpoint, and no hidden dir is left."""
    import errno

    from tui_trainer.core.events import Failed, State
    from tui_trainer.engine.faults import Hooks

    def full(path: Path) -> None:
        if path.name == "__0_0.distcp" and step_of(path) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    store = RunStore(tmp_path / "runs")
    overrides = fsdp_overrides(small_corpus, model__dropout=0.0, train__batch_size=8, checkpoint__every_steps=2)
    events: list = []
    plan = plan_train(store, load_config(None, overrides), "f")
    hooks = Hooks(before_checkpoint_file=full)
    assert Trainer(store, plan, events.append, until_step=8, hooks=hooks).run() == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "disk", failed
    assert "could not save checkpoint step 4 in" in failed[0].message
    assert "No space left on device (writing __0_0.distcp, rank 0)" in failed[0].message, failed[0].message
    assert "older checkpoints are intact" in failed[0].message and failed[0].last_good == "f@2"
    assert checkpoint_steps(store, "f") == [2] and store.read_record("f")["status"] == "paused"
    verify_checkpoint(store.checkpoint_dir("f", 2))
    assert not [p for p in store.checkpoints_dir("f").iterdir() if p.name.startswith(".")]


def test_a_fresh_fsdp_run_starts_from_the_model_one_process_builds(runs):
    # rank 1 builds no weights of its own (a meta-device skeleton that gets rank 0's by broadcast); the first
    # loss, before any update, is one process's with the same seed over the same 8 sequences (h0: batch 8)
    store = runs["store"]
    two_ranks, one_process = losses(store, "ref0"), losses(store, "h0")
    assert two_ranks[1] == pytest.approx(one_process[1], abs=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_skeleton_materialises_with_the_real_models_buffers_and_names(arch):
    from tui_trainer.engine import fsdp, models

    config = load_config(None, [f"model.arch={arch}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"])
    real = models.new_model(config, 320, 0)
    with models.parameters_on_meta():
        skeleton = models.new_model(config, 320, 0)
    skeleton.tie_weights()
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight  # still tied
    fsdp.materialise(skeleton, torch.device("cpu"))
    assert not any(p.is_meta for p in skeleton.parameters())
    assert skeleton.state_dict().keys() == real.state_dict().keys()
    buffers = dict(skeleton.named_buffers())  # computed, not saved (Llama's rotary inv_freq): kept
    assert buffers.keys() == dict(real.named_buffers()).keys()
    for name, buffer in real.named_buffers():
        assert torch.equal(buffers[name], buffer), name

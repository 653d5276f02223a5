"""The distributed building blocks: torchrun's environment, the global-batch split, the step vote."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tui_trainer.core.errors import UserError
from tui_trainer.core.launch import read_env, strip_nproc, torchrun_command, world_size
from tui_trainer.engine.sampler import BlockSampler, rank_slice


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_slices_concatenated_are_the_one_process_batch(world):
    # 3 epochs' worth of micro-steps, ragged epoch ends included: the split never changes which blocks a step sees
    n_blocks, batch = 103, 4
    one = BlockSampler(n_blocks, batch * world, seed=7)
    ranks = [BlockSampler(n_blocks, batch, seed=7, world_size=world, rank=r) for r in range(world)]
    for _ in range(3 * n_blocks // (batch * world)):
        expected = one.next_indices()
        parts = [s.next_indices() for s in ranks]
        assert all(len(p) == batch for p in parts)
        assert torch.equal(torch.cat(parts), expected)
        # one global cursor: any rank's checkpoint fits all
        assert all(s.state_dict() == one.state_dict() for s in ranks)


def test_rank_slice_is_contiguous_in_rank_order():
    batch = torch.arange(12)
    assert [rank_slice(batch, r, 3).tolist() for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_torchrun_environment_is_read_or_refused_in_one_line():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    got = read_env(env)
    assert got is not None and (got.rank, got.world_size, got.local_rank, got.is_main) == (1, 2, 1, False)
    assert read_env({}) is None and world_size({}) == 1 and world_size(env) == 2
    with pytest.raises(UserError, match="MASTER_PORT is not set"):
        read_env({**env, "MASTER_PORT": ""})
    with pytest.raises(UserError, match="RANK=2 does not fit WORLD_SIZE=2"):
        read_env({**env, "RANK": "2"})


def test_nproc_launches_the_same_command_through_torchrun_headless():
    cmd = torchrun_command(["train", "--name", "a", "--nproc", "2", "--set", "train.seed=1"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    tail = cmd[cmd.index("--") + 1 :]
    assert tail == ["train", "--name", "a", "--set", "train.seed=1", "--headless"]
    assert strip_nproc(["resume", "r", "--nproc=4", "--json"]) == ["resume", "r", "--json"]


# ---------------------------------------------------------------- real collectives (2 gloo processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vote_worker(rank: int, port: int, out: str) -> None:
    import os

    from tui_trainer.engine import distributed as d

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with d.joined() as dd:
        vote = d.StepVote(dd)
        results = []
        # step 0: nobody wants anything; step 1: rank 1 pauses; step 2: rank 0 saves, rank 1 is non-finite
        wishes = [[d.Flag(0), d.Flag(0)], [d.Flag(0), d.Flag.PAUSE], [d.Flag.SAVE, d.Flag.NONFINITE]]
        for step in wishes:
            results.append(int(vote(step[rank])))
        loss = dd.mean(torch.tensor(float(rank + 1)))  # ranks log 1.0 and 2.0: the logged loss is 1.5
        rngs = dd.gather_objects({"rank": rank})
        promised = dd.broadcast_object(17 if rank == 0 else None)
        Path(out, f"rank{rank}.txt").write_text(repr((results, loss.item(), rngs, promised)))


@pytest.mark.slow
def test_every_rank_acts_on_what_any_rank_wants_on_the_same_step(tmp_path):
    mp.spawn(_vote_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    from tui_trainer.engine.distributed import Flag

    want = (
        [0, int(Flag.PAUSE), int(Flag.SAVE | Flag.NONFINITE)],
        1.5,
        [{"rank": 0}, {"rank": 1}],
        17,
    )
    for rank in (0, 1):
        assert eval((tmp_path / f"rank{rank}.txt").read_text()) == want


# ---------------------------------------------------------------- world size in the store


@pytest.fixture
def paused_run(tmp_path, tiny):
    from tui_trainer.core.config import load_config
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    store = RunStore(tmp_path / "runs")
    assert Trainer(store, plan_train(store, load_config(None, tiny()), "w"), until_step=2).run() == "Paused"
    return store


def test_resuming_on_another_number_of_ranks_continues_in_a_branch(paused_run):
    from tui_trainer.core.plan import plan_resume

    store = paused_run
    assert store.read_record("w")["world_size"] == 1
    same = plan_resume(store, "w", world_size=1)
    assert (same.run, same.new_run) == ("w", False)
    other = plan_resume(store, "w", world_size=2)
    assert (other.run, other.new_run, other.parent) == ("w-from2", True, ("w", 2))
    assert any("runs on 2 rank(s), not 1" in note for note in other.notes)


def test_ls_shows_the_world_size_of_a_data_parallel_run(paused_run, capsys):
    import json

    from tui_trainer.cli import main

    paused_run.update_record("w", world_size=2)
    assert main(["ls", "--runs-dir", str(paused_run.root)]) == 0
    assert "w  [paused]  1 checkpoint  2 ranks" in capsys.readouterr().out
    assert main(["ls", "--json", "--runs-dir", str(paused_run.root)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["world_size"] == 2


def test_nproc_checks_the_request_once_before_launching(tmp_path, tiny, capsys):
    from tui_trainer.cli import main

    runs = ["--runs-dir", str(tmp_path / "runs")]
    sets = [arg for o in tiny(optim__lr=5.0) for arg in ("--set", o)]
    assert main(["train", "--nproc", "2", *runs, *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0], err
    assert main(["train", "--nproc", "0", *runs]) == 2
    assert "--nproc: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

"""Data-parallel runs from the CLI: `--nproc N` becomes torchrun, and each torchrun worker joins the job,
takes rank 0's plan and trains headless (ARCHITECTURE.md, "Distributed")."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from tui_trainer.cli.headless import _install_signal_handlers, _train_headless
from tui_trainer.core.errors import RunAlreadyFinished, UserError
from tui_trainer.core.launch import torchrun_command
from tui_trainer.core.store import RunStore

EXIT_REFUSED = 2  # rank 0 printed why the request is bad input; the other ranks leave with its exit code

Planner = Callable[[str, RunStore, argparse.Namespace, int], Any]


def launch_torchrun(argv: list[str], nproc: int) -> NoReturn:
    """`--nproc N`, the request already checked (bad input fails once, not N times): become torchrun."""
    cmd = torchrun_command(argv, nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the user's pid is torchrun's: a signal to it reaches every worker


def train_distributed(store: RunStore, args: argparse.Namespace, plan_request: Planner) -> int:
    """One torchrun worker: join the job, take rank 0's plan (one run name, one check of the store),
    train headless. Only rank 0 prints progress and bad-input errors."""
    from tui_trainer.engine import distributed

    with distributed.joined() as dist:
        planned: Any = None
        if dist.is_main:
            try:
                planned = plan_request(args.command, store, args, dist.world_size)
            except UserError as exc:
                planned = f"{exc}"
            except RunAlreadyFinished as exc:  # --auto-resume (or a restart) of a finished run: all exit 0
                planned = ("finished", str(exc))
        plan = dist.broadcast_object(planned, setup=True)
        if isinstance(plan, str):  # rank 0 refused the request: it says so, the others just leave
            if dist.is_main:
                raise UserError(plan)
            return EXIT_REFUSED
        if isinstance(plan, tuple):
            if dist.is_main:
                raise RunAlreadyFinished(plan[1])
            return 0
        try:
            if dist.is_main:  # rank 0 speaks for the job and serves its control channel
                return _train_headless(store, plan, args.until_step, as_json=args.json, dist=dist)
            return _train_rank(store, plan, args.until_step, dist)
        except Exception as exc:
            if not distributed.peer_failed(exc):
                raise
            # a peer died or left while this rank was setting up (its own message says why): one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"rank {dist.rank}: the job ended under this rank ({first})", file=sys.stderr, flush=True)
            return 1


def _train_rank(store: RunStore, plan: Any, until_step: int | None, dist: Any) -> int:
    """A rank other than 0: trains its share, says only where it ended; a signal still pauses the job."""
    from tui_trainer.core.events import State
    from tui_trainer.engine.trainer import Trainer

    trainer = Trainer(store, plan, _RankLines(dist.rank), until_step=until_step, dist=dist)
    restore = _install_signal_handlers(trainer.pause)
    try:
        state = trainer.run()
    finally:
        restore()
    return 1 if state == State.FAILED or trainer.failure is not None else 0


class _RankLines:
    """The sink of ranks other than 0: silent but for a failure and where the rank ended, named by rank
    (rank 0 prints the job's progress)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, event: Any) -> None:
        from tui_trainer.core.events import Failed, State, StateChanged

        if isinstance(event, Failed):
            self._line(f"error at step {event.step}: {event.message}")
        elif isinstance(event, StateChanged) and event.state in (State.PAUSED, State.FINISHED, State.STOPPED):
            self._line(f"{event.state} {event.run} at step {event.step}")

    def _line(self, text: str) -> None:
        print(f"rank {self.rank}: {text}", file=sys.stderr, flush=True)

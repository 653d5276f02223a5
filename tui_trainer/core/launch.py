"""Starting training processes, torch-free: torchrun's side of a distributed run (the worker's environment
and the `--nproc` launch) and a run started in the background (`--detach`, and the app's r / b while it is
attached to another process's run). The CLI and the app both use this.

torchrun starts one process per rank and tells each who it is through RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The CLI and the plan read them here without importing torch; the engine
(engine/distributed.py) joins the process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_trainer.core.errors import UserError
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore
from tui_trainer.core.store.files import open_regular

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells a worker through its environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """torchrun's variables, or None when this process was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    missing = [name for name in TORCHRUN_VARS if not env.get(name)]
    if missing:
        raise UserError(f"started as a distributed worker but {', '.join(missing)} is not set (launch with torchrun)")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"RANK={rank} does not fit WORLD_SIZE={world} (LOCAL_RANK={local})")
    return DistEnv(rank, world, local, env["MASTER_ADDR"], env["MASTER_PORT"])


# Supervisors that restart a job by running the same command line again, and what they tell the new process:
# torchrun's elastic agent (TORCHELASTIC_RUN_ID is its rendezvous id, the same for every restart of one job;
# TORCHELASTIC_RESTART_COUNT counts its restarts) and Slurm (`--requeue`: SLURM_JOB_ID stays, the
# SLURM_RESTART_COUNT counts requeues).
JOB_VARS = {
    "torchelastic_run_id": "TORCHELASTIC_RUN_ID",
    "torchelastic_restart_count": "TORCHELASTIC_RESTART_COUNT",
    "torchelastic_max_restarts": "TORCHELASTIC_MAX_RESTARTS",
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
}


def job_identity(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The supervisor's job ids and restart counts this process was started with (recorded in run.json as
    `launch` each time a job trains the run); empty outside torchrun and Slurm."""
    env = os.environ if environ is None else environ
    return {key: env[var] for key, var in JOB_VARS.items() if env.get(var)}


def _count(env: Mapping[str, str], var: str) -> int:
    try:
        return int(env.get(var) or 0)
    except ValueError:
        return 0


def elastic_restart_of(record: Mapping[str, object], environ: Mapping[str, str] | None = None) -> bool:
    """This process is torchrun restarting the job that last trained the run `record` describes: a restart
    count above 0 and the same rendezvous id. Another job under the same name is not (it is refused)."""
    env = os.environ if environ is None else environ
    launch = record.get("launch")
    recorded = launch.get("torchelastic_run_id") if isinstance(launch, Mapping) else None
    return (
        _count(env, "TORCHELASTIC_RESTART_COUNT") > 0 and bool(recorded) and recorded == env.get("TORCHELASTIC_RUN_ID")
    )


def restarts_itself(record: Mapping[str, object], *, failed: bool = False) -> bool:
    """A supervisor brings this run back when its process dies: it trains under torchrun with restarts
    left to it (`--max-restarts`), or was started with `--auto-resume` (Slurm, systemd, Kubernetes).
    `failed`: the process said it failed before it exited (rank 0 of a job whose other rank was killed
    does): torchrun restarts the job all the same, but a Slurm requeue or a Kubernetes restart is not
    owed to a failed --auto-resume run, so only an elastic job counts."""
    launch = record.get("launch")
    restarts = launch.get("torchelastic_max_restarts") if isinstance(launch, Mapping) else None
    elastic = _count({"n": str(restarts or 0)}, "n") > 0
    return elastic or (record.get("auto_resume") is True and not failed)


def restart_reason(environ: Mapping[str, str] | None = None) -> str:
    """Why a run continues on its own, for its metrics.jsonl marker: an elastic restart, a Slurm requeue, or
    a plain `--auto-resume` (any other supervisor, or a person running the command again)."""
    env = os.environ if environ is None else environ
    if _count(env, "TORCHELASTIC_RESTART_COUNT") > 0:
        return "elastic restart"
    if _count(env, "SLURM_RESTART_COUNT") > 0:
        return "requeue"
    return "auto-resume"


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """This job's number of ranks: 1 outside torchrun."""
    env = read_env(environ)
    return env.world_size if env else 1


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (the workers must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The single-node launch `--nproc N` stands for: torchrun with N workers on this machine, each
    running the same command headless. `--` keeps torchrun's parser off our options (it would read
    `--run` as an abbreviation of its own `--run-path`)."""
    args = strip_nproc(argv)
    if "--headless" not in args and "--json" not in args:
        args.append("--headless")  # one app cannot drive N processes; rank 0 prints the progress
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a private rendezvous on a free local port
        "--nproc-per-node",
        str(nproc),
        "-m",
        "tui_trainer",
        "--",
        *args,
    ]


# ---------------------------------------------------------------- detached processes
# `--detach` and the app (r / b while attached) start a run in the background the same way: its own
# session, output to runs/<run>/train.log, the announced run name pinned.

LOG_NAME = "train.log"
DETACHED_ENV = "TUI_TRAINER_DETACHED"  # set in a detached child: it never detaches again


def log_tail(log: Path) -> str:
    """The end of our own train.log; a link planted there is neither followed nor echoed."""
    try:
        fd = open_regular(log)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, 4096, max(0, size - 4096)).decode(errors="replace")
    finally:
        os.close(fd)


def spawn_detached(argv: Sequence[str], store: RunStore, run: str, *, name_option: bool) -> int:
    """Start `tui-trainer <argv> --headless` (minus --detach) in its own session, output to
    runs/<run>/train.log; returns its pid. The run name is fixed here so that the child trains the run
    this command announced."""
    child = [a for a in argv if not _is_detach_flag(a)] + ["--headless"]
    if name_option:  # a new run's name was picked here: pin it, so the child trains the announced run
        child += ["--name", run]
    run_dir = store.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)  # no run.json yet: the child still creates the run
    try:  # never through a planted symlink (it would append our output to its target)
        log_fd = open_regular(run_dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise UserError(f"{run_dir / LOG_NAME}: {exc.strerror}") from None
    with os.fdopen(log_fd, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui_trainer", *child],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no controlling terminal: closing it or logging out sends no SIGHUP
            env={**os.environ, DETACHED_ENV: "1"},
        )
    proc.returncode = 0  # not ours to wait for; keeps Popen's destructor quiet
    return proc.pid


def plan_argv(store: RunStore, plan: RunPlan) -> list[str]:
    """The command line that makes a process train `plan` (the app's r / b, run detached when attached)."""
    where = ["--runs-dir", str(store.root)]
    if plan.world_size > 1:  # a data-parallel run goes on with as many ranks (launched through torchrun)
        where += ["--nproc", str(plan.world_size)]
    if not plan.new_run or plan.parent is None:
        return ["resume", plan.run, *where]  # the run itself, from its newest checkpoint
    parent, step = plan.parent
    changed = _changed(store.run(parent).config, plan.config.to_dict())
    return ["branch", f"{parent}@{step}", "--name", plan.run, *where, *(a for kv in changed for a in ("--set", kv))]


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`section.key=<TOML value>` for every key whose value differs."""
    out = []
    for section, keys in after.items():
        for key, value in keys.items():
            if (before.get(section) or {}).get(key) != value:
                out.append(f"{section}.{key}={_toml(value)}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def process_running(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, and it exited (reaped now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_detach_flag(arg: str) -> bool:
    # argparse accepts unambiguous prefixes (--det); a detach flag left in the child would fork again
    return len(arg) > 3 and "--detach".startswith(arg)


def detached() -> bool:
    return os.environ.get(DETACHED_ENV) == "1"

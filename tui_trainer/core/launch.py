"""torchrun's side of a distributed run, torch-free: the worker's environment and the `--nproc` launch.

torchrun starts one process per rank and tells each who it is through RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The CLI and the plan read them here without importing torch; the engine
(engine/distributed.py) joins the process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tui_trainer.core.errors import UserError

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

"""`tui-trainer …`: argument parsing and dispatch only. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tui_trainer.cli import control
from tui_trainer.cli.browse import _export, _generate, _ls, _print_config, _verify
from tui_trainer.cli.distributed import launch_torchrun, train_distributed
from tui_trainer.cli.headless import _train_headless
from tui_trainer.control.live import connect_live
from tui_trainer.core.config import Config, load_config
from tui_trainer.core.errors import Busy, ChannelRefused, RunAlreadyFinished, UserError
from tui_trainer.core.launch import detached, elastic_restart_of, read_env, restart_reason, spawn_detached
from tui_trainer.core.store import RunStore

if TYPE_CHECKING:
    from tui_trainer.core.plan import RunPlan

EXIT_USAGE = 2
EXIT_NOT_DONE = 1  # e.g. a control socket that is not to be trusted: nothing was done, but not bad input
EXIT_BUSY = 75  # EX_TEMPFAIL: the training process cannot take us now (too many clients); try again
DEMO_RUN = "demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other bad input
        # main() prefixes "tui-trainer: error: "; name only the subcommand here, not the program twice
        command = self.prog.removeprefix("tui-trainer").strip()
        raise UserError(f"{command}: {message}" if command else message)


DESCRIPTION = """\
Train GPT-2-style language models from a terminal.

With no command, `tui-trainer` opens the app on ./runs and trains the demo: a tiny GPT-2 on the
shipped Shakespeare sample. Run it again and it continues the paused demo where it stopped; once
that demo has finished, a fresh one (demo-2, ...) starts beside it."""

EPILOG = """\
RUN[@STEP] names a checkpoint; RUN alone means its newest valid one. Bad input prints one line and
exits with 2; a training fault (NaN loss, disk full, out of memory) pauses the run and exits with 1.
`tui-trainer config` prints every config key with its meaning."""


def _subcommand(sub: Any, name: str, summary: str, parents: list[argparse.ArgumentParser]) -> _Parser:
    parser: _Parser = sub.add_parser(
        name, parents=parents, help=summary, description=summary[0].upper() + summary[1:] + "."
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tui-trainer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND", title="commands")
    common = _common_options()
    # the order of these calls is the order of the commands in --help
    _add_training_commands(sub, [common, _training_options()])
    _add_browsing_commands(sub, [common])
    _add_live_commands(sub, [common])
    _add_config_command(sub)
    return parser


def _common_options() -> _Parser:
    """Options every command that reads the store shares."""
    common = _Parser(add_help=False)
    common.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs live (default: ./runs)")
    return common


def _training_options() -> _Parser:
    """Options train, resume and branch share: overrides, when to stop, and how to run."""
    training = _Parser(add_help=False)
    training.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; values parse as TOML)",
    )
    training.add_argument(
        "--until-step",
        type=int,
        metavar="N",
        help="pause after step N (save a checkpoint and halt, like the app's p key); the bar counts to N",
    )
    training.add_argument(
        "--headless", action="store_true", help="no app: a progress bar on a terminal, plain lines otherwise"
    )
    training.add_argument("--json", action="store_true", help="headless, one JSON event per line on stdout")
    training.add_argument(
        "--detach",
        action="store_true",
        help="train in the background (survives the terminal; output to runs/<run>/train.log); on a terminal "
        "the app opens attached to it, with --headless (or no terminal) it returns at once",
    )
    training.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel on N processes of this machine (launched through torchrun); on a terminal the job "
        "trains in the background and the app attaches to its rank 0",
    )
    return training


def _add_training_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = _subcommand(sub, "train", "start a new run", parents)
    # --name: torchrun's own parser mistakes --run for its --run-path; --run stays as an alias
    p.add_argument(
        "--name", "--run", dest="run", metavar="NAME", help="run name (default: the next free run-1, run-2, ...)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (sections as `tui-trainer config` prints)")
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="for supervisors that run the same command again (Slurm --requeue, systemd, Kubernetes): start the "
        "run if it does not exist, else continue it from its newest valid checkpoint (same settings only); "
        "exit 0 at once if it already finished",
    )
    p = _subcommand(sub, "resume", "continue RUN from its newest checkpoint, or RUN@STEP", parents)
    p.add_argument(
        "ref", metavar="RUN[@STEP]", help="an older step or changed --set values continue in a new branch run"
    )
    p.add_argument(
        "--name",
        "--run",
        dest="run",
        metavar="NEW",
        help="the branch run's name, if it becomes one (default: RUN-fromSTEP)",
    )
    p = _subcommand(sub, "branch", "start a new run from a checkpoint, with changed settings", parents)
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint the new run starts from")
    p.add_argument("--name", "--run", dest="run", metavar="NEW", help="name of the new run (default: RUN-fromSTEP)")


def _add_browsing_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = _subcommand(
        sub, "ls", "list runs as a tree with their checkpoints (★ newest ◆ best ⚑ pinned ✗ invalid)", parents
    )
    p.add_argument("--json", action="store_true", help="machine-readable: one JSON array of runs")
    p = _subcommand(sub, "verify", "re-hash checkpoints against their manifests; exit 1 if any fails", parents)
    p.add_argument("ref", nargs="?", metavar="RUN[@STEP]", help="what to check (default: every checkpoint)")
    p = _subcommand(sub, "generate", "sample text from a checkpoint", parents)
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint to sample from")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text the sample continues (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default: 100)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    p = _subcommand(sub, "export", "write a checkpoint as a clean Hugging Face model dir with a model card", parents)
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint to export (verified first)")
    p.add_argument(
        "dir",
        metavar="DIR",
        help="the model dir to create, outside the runs dir (refused if not empty, unless --force)",
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default: fp32)")
    p.add_argument(
        "--force", action="store_true", help="replace DIR when it holds a previous export (and nothing else)"
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA checkpoint: write the adapter alone (PEFT's format) instead of merging it into its base",
    )
    _subcommand(sub, "open", "open the app to browse runs without training", parents)


def _add_live_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """attach, and the control commands that reach a live run over its channel."""
    p = _subcommand(sub, "attach", "open the app on a run another process trains; q detaches", parents)
    p.add_argument("run", nargs="?", metavar="RUN", help="the live run (default: the only one)")
    live = _Parser(add_help=False)
    live.add_argument("run", metavar="RUN", help="the run's name")
    live.add_argument("--json", action="store_true", help="machine-readable: one JSON object")
    parents = [*parents, live]
    _subcommand(sub, "pause", "pause a live run (checkpoint, halt); prints the step", parents)
    _subcommand(sub, "save", "save a checkpoint of a live run now; prints the step", parents)
    _subcommand(sub, "status", "state, step, loss, tokens/s and last checkpoint of a run, live or not", parents)


def _add_config_command(sub: Any) -> None:
    p = _subcommand(sub, "config", "print the config as TOML, with each key's meaning", [])
    p.add_argument("--config", metavar="FILE", help="show this file merged over the defaults")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="K=V", help="override a key (repeatable)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # --detach and --nproc start the same command line again, headless
        return _dispatch(args)
    except UserError as exc:
        print(f"tui-trainer: error: {exc}", file=sys.stderr)
        return EXIT_BUSY if isinstance(exc, Busy) else EXIT_NOT_DONE if isinstance(exc, ChannelRefused) else EXIT_USAGE
    except RunAlreadyFinished as exc:  # --auto-resume of a finished run: success, nothing written
        print(f"tui-trainer: {exc}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("tui-trainer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tui-trainer ls | head`: the reader left, nothing to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command is None:
        _need_terminal("tui-trainer", "tui-trainer train --headless trains the demo without it")
        return _open_app(Path("runs"), demo_plan(RunStore("runs")), None)
    if command == "config":
        return _print_config(load_config(args.config, args.overrides))
    store = RunStore(args.runs_dir)
    if command in ("train", "resume", "branch"):
        if args.until_step is not None and args.until_step < 0:
            raise UserError(f"--until-step: must be >= 0, got {args.until_step}")
        if read_env() is not None:  # a torchrun worker
            return train_distributed(store, args, _plan)
        if args.nproc is not None and args.nproc < 1:
            raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
        # validates everything before a detached child or torchrun's workers are started
        plan = _plan(command, store, args, args.nproc or 1)
        app_wanted = not (args.headless or args.json) and not _not_terminals()
        # one app cannot host N processes: on a terminal, --nproc trains in the background like --detach and
        # the app attaches to rank 0
        if (args.detach or (args.nproc is not None and app_wanted)) and not detached():
            # a new run's name is picked now: pin it, so the child trains the run announced here
            name_option = plan.new_run and args.run is None
            if not app_wanted:
                return control.detach(args.argv, store, plan.run, name_option=name_option)
            # on a terminal: train in the background and open the app attached (closing it leaves the run)
            pid = spawn_detached(args.argv, store, plan.run, name_option=name_option)
            return _open_app(store.root, None, None, pending=(plan.run, pid))
        if args.nproc is not None:
            return launch_torchrun(args.argv, args.nproc)
        if args.headless or args.json or args.detach:
            return _train_headless(store, plan, args.until_step, as_json=args.json)
        return _open_app(store.root, plan, args.until_step)
    if command == "ls":
        return _ls(store, as_json=args.json)
    if command == "verify":
        return _verify(store, args.ref)
    if command == "generate":
        return _generate(store, args)
    if command == "export":
        return _export(store, args)
    if command == "open":
        _need_terminal("tui-trainer open", "tui-trainer ls lists the runs")
        return _open_app(store.root, None, None)
    if command == "attach":
        remote = connect_live(store, args.run)  # a missing or idle run is named first
        try:
            run = remote.hello.get("run") or args.run or "RUN"
            _need_terminal("tui-trainer attach", f"tui-trainer status {run} prints how the run goes")
        except UserError:
            remote.close()
            raise
        return _open_app(store.root, None, None, remote=remote)
    if command in ("pause", "save", "status"):
        action = {"pause": control.pause, "save": control.save, "status": control.status}[command]
        return action(store, args.run, as_json=args.json)
    raise UserError(f"unknown command {command!r}")  # pragma: no cover - argparse catches this


def _plan(command: str, store: RunStore, args: argparse.Namespace, world_size: int = 1) -> Any:
    from tui_trainer.core.plan import plan_auto_resume, plan_branch, plan_resume, plan_train

    if command == "train":
        config = load_config(args.config, args.overrides)
        # torchrun restarting the job that trains this run (TORCHELASTIC_RUN_ID recorded by its first start)
        # continues it like --auto-resume, no flag needed; another job under the same name is still refused
        elastic = bool(args.run) and store.exists(args.run) and elastic_restart_of(store.read_record(args.run))
        if args.auto_resume or elastic:
            return plan_auto_resume(store, config, args.run, world_size, reason=restart_reason())
        return plan_train(store, config, args.run)
    if command == "resume":
        return plan_resume(store, args.ref, args.overrides, world_size, name=args.run)
    return plan_branch(store, args.ref, args.run, args.overrides)


def demo_plan(store: RunStore) -> RunPlan:
    """What a bare `tui-trainer` trains: the newest demo run (demo, demo-2, …) continues while it has
    steps to go; once it finished (or cannot continue), a fresh one starts beside it."""
    from tui_trainer.core.plan import default_run_name, plan_resume, plan_train

    note = ""
    latest = _latest_demo(store)
    if latest is not None:
        info = store.run(latest)
        max_steps = info.config.get("train", {}).get("max_steps")
        newest = info.newest
        if newest is not None and isinstance(max_steps, int) and newest.step >= max_steps:
            note = f"{latest} finished at step {newest.step}; starting a fresh demo run"
        else:
            try:
                plan = plan_resume(store, latest)
            except UserError as exc:
                note = f"cannot continue {latest} ({exc}); starting a fresh demo run"
            else:
                if plan.start is not None:
                    plan.notes.append(f"continuing the paused {latest} run from step {plan.start_step}")
                return plan
    plan = plan_train(store, Config().validate(), default_run_name(store, DEMO_RUN))
    if note:
        plan.notes.append(f"{note} {plan.run!r}")
    return plan


def _latest_demo(store: RunStore) -> str | None:
    """The most recently created run named demo or demo-N (a run the bare command started)."""
    names = [n for n in store.run_names() if re.fullmatch(rf"{DEMO_RUN}(-\d+)?", n)]
    created: dict[str, float] = {}
    for name in names:
        with contextlib.suppress(UserError):
            created[name] = float(store.read_record(name).get("created", 0.0))
    return max(created, key=lambda n: created[n]) if created else None


def _not_terminals() -> list[str]:
    """Which of stdin and stdout are not a terminal (a pipe, a file, /dev/null, closed)."""
    return [name for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)) if not _isatty(stream)]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError):  # a closed stream
        return False


def _need_terminal(what: str, instead: str) -> None:
    """The app reads keys and paints a full screen: without a terminal it would paint escape codes into a
    pipe forever, so it is refused at once, like bad input."""
    missing = _not_terminals()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(
            f"{what} opens the full-screen app, which needs a terminal; {' and '.join(missing)} {verb} "
            f"not one ({instead})"
        )


def _open_app(
    runs_dir: Path, plan: Any, until_step: int | None, remote: Any = None, pending: tuple[str, int] | None = None
) -> int:
    """`remote`: attach to that client's run; `pending`: (run, pid) just started detached, attach once live."""
    from tui_trainer.tui.app import run_app

    return run_app(runs_dir, plan, until_step, remote, pending)


def _version() -> str:
    from tui_trainer import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`tui-trainer …`: argument parsing and dispatch only. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from tui_trainer.control import commands as control
from tui_trainer.core import fmt
from tui_trainer.core.config import Config, load_config, to_toml
from tui_trainer.core.errors import CheckpointInvalid, UserError
from tui_trainer.core.launch import read_env, torchrun_command
from tui_trainer.core.store import RunStore, iter_tree, json_safe, parse_ref, verify_checkpoint

if TYPE_CHECKING:
    from tui_trainer.core.plan import RunPlan

EXIT_USAGE = 2
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
    common = _Parser(add_help=False)
    common.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs live (default: ./runs)")
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
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel on N processes of this machine (launches this command through torchrun, headless)",
    )
    training.add_argument(
        "--detach",
        action="store_true",
        help="train in the background (survives the terminal; output to runs/<run>/train.log); on a terminal "
        "the app opens attached to it, with --headless (or no terminal) it returns at once",
    )

    parser = _Parser(
        prog="tui-trainer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND", title="commands")

    p = _subcommand(sub, "train", "start a new run", [common, training])
    # --name: torchrun's own parser mistakes --run for its --run-path; --run stays as an alias
    p.add_argument(
        "--name", "--run", dest="run", metavar="NAME", help="run name (default: the next free run-1, run-2, ...)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (sections as `tui-trainer config` prints)")
    p = _subcommand(sub, "resume", "continue RUN from its newest checkpoint, or RUN@STEP", [common, training])
    p.add_argument(
        "ref", metavar="RUN[@STEP]", help="an older step or changed --set values continue in a new branch run"
    )
    p = _subcommand(sub, "branch", "start a new run from a checkpoint, with changed settings", [common, training])
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint the new run starts from")
    p.add_argument("--name", "--run", dest="run", metavar="NEW", help="name of the new run (default: RUN-fromSTEP)")
    p = _subcommand(
        sub, "ls", "list runs as a tree with their checkpoints (★ newest ◆ best ⚑ pinned ✗ invalid)", [common]
    )
    p.add_argument("--json", action="store_true", help="machine-readable: one JSON array of runs")
    p = _subcommand(sub, "verify", "re-hash checkpoints against their manifests; exit 1 if any fails", [common])
    p.add_argument("ref", nargs="?", metavar="RUN[@STEP]", help="what to check (default: every checkpoint)")
    p = _subcommand(sub, "generate", "sample text from a checkpoint", [common])
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint to sample from")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text the sample continues (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default: 100)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    p = _subcommand(sub, "export", "write a checkpoint as a clean Hugging Face model dir with a model card", [common])
    p.add_argument("ref", metavar="RUN[@STEP]", help="the checkpoint to export (verified first)")
    p.add_argument("dir", metavar="DIR", help="the model dir to create (refused if not empty, unless --force)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace DIR even if it is not empty")
    _subcommand(sub, "open", "open the app to browse runs without training", [common])
    p = _subcommand(sub, "attach", "open the app on a run another process trains; q detaches", [common])
    p.add_argument("run", nargs="?", metavar="RUN", help="the live run (default: the only one)")
    live = _Parser(add_help=False)
    live.add_argument("run", metavar="RUN", help="the run's name")
    live.add_argument("--json", action="store_true", help="machine-readable: one JSON object")
    _subcommand(sub, "pause", "pause a live run (checkpoint, halt); prints the step", [common, live])
    _subcommand(sub, "save", "save a checkpoint of a live run now; prints the step", [common, live])
    _subcommand(sub, "status", "state, step, loss, tokens/s and last checkpoint of a run, live or not", [common, live])
    p = _subcommand(sub, "config", "print the config as TOML, with each key's meaning", [])
    p.add_argument("--config", metavar="FILE", help="show this file merged over the defaults")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="K=V", help="override a key (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # --detach and --nproc start the same command line again, headless
        return _dispatch(args)
    except UserError as exc:
        print(f"tui-trainer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
        return _open_app(Path("runs"), demo_plan(RunStore("runs")), None)
    if command == "config":
        return _print_config(load_config(args.config, args.overrides))
    store = RunStore(args.runs_dir)
    if command in ("train", "resume", "branch"):
        if args.until_step is not None and args.until_step < 0:
            raise UserError(f"--until-step: must be >= 0, got {args.until_step}")
        if read_env() is not None:  # a torchrun worker
            return _train_distributed(store, command, args)
        if args.nproc is not None and args.nproc < 1:
            raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
        # validates everything before a detached child or torchrun's workers are started
        plan = _plan(command, store, args, args.nproc or 1)
        if args.detach and not control.detached():
            name_option = command != "resume" and args.run is None
            if args.headless or args.json or not sys.stdout.isatty():
                return control.detach(args.argv, store, plan.run, name_option=name_option)
            # on a terminal: train in the background and open the app attached (closing it leaves the run)
            pid = control.spawn_detached(args.argv, store, plan.run, name_option=name_option)
            return _open_app(store.root, None, None, pending=(plan.run, pid))
        if args.nproc is not None:
            return _launch_torchrun(args.argv, args.nproc)
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
        return _open_app(store.root, None, None)
    if command == "attach":
        return _open_app(store.root, None, None, remote=control.connect_live(store, args.run))
    if command in ("pause", "save", "status"):
        action = {"pause": control.pause, "save": control.save, "status": control.status}[command]
        return action(store, args.run, as_json=args.json)
    raise UserError(f"unknown command {command!r}")  # pragma: no cover - argparse catches this


def _plan(command: str, store: RunStore, args: argparse.Namespace, world_size: int = 1) -> Any:
    from tui_trainer.core.plan import plan_branch, plan_resume, plan_train

    if command == "train":
        return plan_train(store, load_config(args.config, args.overrides), args.run)
    if command == "resume":
        return plan_resume(store, args.ref, args.overrides, world_size)
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


def _open_app(
    runs_dir: Path, plan: Any, until_step: int | None, remote: Any = None, pending: tuple[str, int] | None = None
) -> int:
    """`remote`: attach to that client's run; `pending`: (run, pid) just started detached, attach once live."""
    from tui_trainer.tui.app import run_app

    return run_app(runs_dir, plan, until_step, remote, pending)


# ---------------------------------------------------------------- headless training


class _Progress:
    """Headless progress: a rich live display on a terminal (fits its width, redraws in place), plain
    periodic lines otherwise, one JSON object per event with --json. The bar counts to --until-step when
    given, else to train.max_steps."""

    PLAIN_EVERY_S = 2.0  # plain lines (logs, pipes) at most this often per bar

    def __init__(
        self,
        as_json: bool,
        stream: Any = None,
        *,
        until_step: int | None = None,
        tty: bool | None = None,
        width: int | None = None,
    ) -> None:
        self.as_json = as_json
        self.stream = stream or (sys.stdout if as_json else sys.stderr)
        self.tty = (self.stream.isatty() if tty is None else tty) and not as_json
        self.until_step = until_step
        self.width = width
        self.live: Any = None  # rich.progress.Progress while a bar is on screen
        self.tasks: dict[str, Any] = {}  # bar name ("train" or a data stage) -> rich task id
        self.last_plain: dict[str, float] = {}
        self.failure = ""
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        # events arrive from the training thread and the checkpoint writer: one locked write per line
        with self.lock:
            self._show(event)

    def close(self) -> None:
        with self.lock:
            self._stop_live()

    def _show(self, event: Any) -> None:
        from tui_trainer.core import events as ev

        if self.as_json:
            record = json_safe({"event": type(event).__name__, **asdict(event)})
            self.stream.write(json.dumps(record, allow_nan=False) + "\n")
            self.stream.flush()
        elif isinstance(event, ev.StepLogged):
            self._step(event)
        elif isinstance(event, ev.DataProgress):
            self._data(event)
        elif isinstance(event, ev.SampleLogged):
            text = " ".join(event.text.split())  # one line: the sample's newlines would break the display
            self._line(f"step {event.step}  sample ({event.seconds:.2f}s): {text[:120]}")
        elif isinstance(event, ev.EvalLogged):
            self._line(f"step {event.step}  eval loss {fmt.loss(event.eval_loss)}")
        elif isinstance(event, ev.CheckpointSaved):
            self._line(f"checkpoint step {event.step} saved ({fmt.size(event.bytes)}, {event.seconds:.2f}s)")
        elif isinstance(event, ev.StateChanged):
            self._state(event)
        elif isinstance(event, ev.Notice):
            self._line(f"note: {event.message}")
        elif isinstance(event, ev.SampleLogged):
            text = " ".join((event.prompt + event.text).split())  # one line, however the sample wraps
            self._line(f"step {event.step}  sample: {text[:70] + '…' if len(text) > 70 else text}")
        elif isinstance(event, ev.Failed):
            self.failure = event.message
            self._line(f"error at step {event.step}: {self._remedy(event)}")

    @staticmethod
    def _remedy(e: Any) -> str:
        branch = f"tui-trainer branch {e.last_good} --set optim.lr=…" if e.last_good else "nothing to branch from"
        return fmt.remedy(e, resume=f"`tui-trainer resume {e.run}`", branch=f"`{branch}`")

    def _step(self, e: Any) -> None:
        total = self.until_step if self.until_step is not None else e.max_steps
        total = max(1, min(total, e.max_steps))
        eta = max(0, total - e.step) * e.step_time  # the engine's eta_s counts to max_steps
        norm = f"  grad norm {fmt.loss(e.grad_norm)}" if e.grad_norm is not None else ""
        info = f"{e.step}/{total}  loss {fmt.loss(e.loss)}{norm}  {fmt.rate(e.tokens_per_s)}  eta {fmt.duration(eta)}"
        if self.tty:
            self._bar("train", e.step, total, info)
        elif self._due("train", e.step >= total):
            self._line(f"step {info}  lr {fmt.lr(e.lr)}")

    def _data(self, e: Any) -> None:
        complete = e.total is not None and e.done >= e.total
        info = f"{min(100, 100 * e.done // e.total)}%" if e.total else f"{e.done:,}"
        if self.tty and not complete:
            self._bar(e.stage, e.done, e.total, info)
        elif self._due(e.stage, complete):
            if e.stage in self.tasks:  # a finished stage leaves one line, not a bar
                self._live().remove_task(self.tasks.pop(e.stage))
            self._line(f"{e.stage} {info}")

    def _state(self, e: Any) -> None:
        from tui_trainer.core.events import State

        if e.state == State.STARTING:
            return  # setup errors must stay the only line; "Running" follows within seconds
        ended = e.state in (State.PAUSED, State.FINISHED, State.FAILED, State.STOPPED)
        where = (
            f" at step {e.step}" if ended else (f" from step {e.step}" if e.state == State.RUNNING and e.step else "")
        )
        detail = e.detail
        if e.state == State.STOPPED:
            detail = "nothing saved"  # the engine's "stopped without saving" would repeat the state word
        if detail == self.failure:
            detail = ""  # the error line just said it
        if ended:
            self._stop_live()
        self._line(f"{e.state} {e.run}{where}" + (f" ({detail})" if detail else ""))

    def _due(self, name: str, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self.last_plain.get(name, -1e9) >= self.PLAIN_EVERY_S:
            self.last_plain[name] = now
            return True
        return False

    def _bar(self, name: str, done: int, total: int | None, info: str) -> None:
        progress = self._live()
        if name not in self.tasks:
            self.tasks[name] = progress.add_task(name, total=total, info=info)
        progress.update(self.tasks[name], completed=done, total=total, info=info)

    def _live(self) -> Any:
        if self.live is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            console = Console(file=self.stream, force_terminal=True, width=self.width)
            self.live = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=None),
                TextColumn("{task.fields[info]}"),
                console=console,
                expand=True,
                refresh_per_second=8,
            )
            self.live.start()
        return self.live

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live, self.tasks = None, {}

    def _line(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False, soft_wrap=True)
            return
        self.stream.write(text + "\n")
        self.stream.flush()


def _train_headless(store: RunStore, plan: Any, until_step: int | None, *, as_json: bool, dist: Any = None) -> int:
    from tui_trainer.control.server import ControlServer, Tee
    from tui_trainer.core.events import State
    from tui_trainer.engine.trainer import Trainer

    if dist is not None and not dist.is_main:  # rank 0 speaks for the job and serves its control channel
        return _train_rank(store, plan, until_step, dist)
    progress = _Progress(as_json, until_step=until_step)
    sink = Tee(progress)
    trainer = Trainer(store, plan, sink, until_step=until_step, dist=dist)
    server = ControlServer(store.run_dir(plan.run), trainer)  # pause/save/status from other processes
    try:
        server.start()
        sink.add(server.publish)
    except OSError as exc:  # training matters more than the channel: say so and go on without it
        print(f"tui-trainer: note: no control channel ({exc}); pause with Ctrl-C or SIGTERM", file=sys.stderr)
    restore = _install_signal_handlers(trainer.pause)
    try:
        state = trainer.run()
    finally:
        restore()
        server.close()  # clients see the final state, then EOF
        progress.close()
    # a fault (nan, disk, oom) pauses the run resumably, but the job did not do what was asked: exit 1
    return 1 if state == State.FAILED or trainer.failure is not None else 0


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


def _install_signal_handlers(pause: Callable[[], int]) -> Callable[[], None]:
    """SIGINT / SIGTERM / SIGHUP: finish the step, save, exit cleanly. A second SIGINT exits at once
    (the last complete checkpoint stays valid: checkpoints are renamed into place only when whole)."""
    interrupts = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                os._exit(130)
        # On a thread: the handler interrupts the training loop's own thread, which may hold the trainer's
        # control lock (under DDP for a whole step vote); pause() waits for it there and keeps its promise.
        threading.Thread(target=announce, args=(signum,), name="signal-pause", daemon=True).start()

    def announce(signum: int) -> None:
        step = pause()
        name = signal.Signals(signum).name
        with contextlib.suppress(OSError):
            os.write(
                2, f"\n{name}: pausing after step {step} (saving a checkpoint); Ctrl-C again to quit now\n".encode()
            )

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, handle) for s in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _launch_torchrun(argv: list[str], nproc: int) -> int:
    """`--nproc N`, the request already checked (bad input fails once, not N times): become torchrun."""
    cmd = torchrun_command(argv, nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the user's pid is torchrun's: a signal to it reaches every worker


def _train_distributed(store: RunStore, command: str, args: argparse.Namespace) -> int:
    """One torchrun worker: join the job, take rank 0's plan (one run name, one check of the store),
    train headless. Only rank 0 prints progress and bad-input errors."""
    from tui_trainer.engine import distributed

    with distributed.joined() as dist:
        planned: Any = None
        if dist.is_main:
            try:
                planned = _plan(command, store, args, dist.world_size)
            except UserError as exc:
                planned = f"{exc}"
        plan = dist.broadcast_object(planned, setup=True)
        if isinstance(plan, str):  # rank 0 refused the request: it says so, the others just leave
            if dist.is_main:
                raise UserError(plan)
            return EXIT_USAGE
        try:
            return _train_headless(store, plan, args.until_step, as_json=args.json, dist=dist)
        except Exception as exc:
            if not distributed.peer_failed(exc):
                raise
            # a peer died or left while this rank was setting up (its own message says why): one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"rank {dist.rank}: the job ended under this rank ({first})", file=sys.stderr, flush=True)
            return 1


# ---------------------------------------------------------------- browsing


def _ls(store: RunStore, *, as_json: bool) -> int:
    tree = list(iter_tree(store))
    if as_json:
        out = []
        for depth, run in tree:
            out.append(
                {
                    "name": run.name,
                    "depth": depth,
                    "status": run.status,
                    "world_size": run.world_size,
                    "parent": {"run": run.parent[0], "step": run.parent[1]} if run.parent else None,
                    "checkpoints": [
                        {
                            "step": c.step,
                            "loss": c.loss,
                            "eval_loss": c.eval_loss,
                            "bytes": c.size_bytes,
                            "valid": c.valid,
                            "problem": c.problem,
                            "pinned": c.pinned,
                            "path": str(c.path),
                        }
                        for c in run.checkpoints
                    ],
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    if not tree:
        print(f"no runs yet in {fmt.folder(store.root)}")
        return 0
    for depth, run in tree:
        pad = "  " * depth
        origin = f"  (from {run.parent[0]}@{run.parent[1]})" if run.parent else ""
        ranks = f"  {fmt.plural(run.world_size, 'rank')}" if run.world_size > 1 else ""
        print(f"{pad}{run.name}  [{run.status}]  {fmt.plural(len(run.checkpoints), 'checkpoint')}{ranks}{origin}")
        for c in run.checkpoints:
            # the app's vocabulary: 3-decimal losses, compact sizes, ★ newest ◆ best ⚑ pinned ✗ invalid
            tail = fmt.marks(run, c) + (f" invalid: {c.problem}" if not c.valid else "")
            print(
                f"{pad}  step {c.step:>7}  loss {fmt.loss(c.loss):>6}  eval {fmt.loss(c.eval_loss):>6}  "
                f"{fmt.size(c.size_bytes):>6}  {tail}".rstrip()
            )
    return 0


def _verify(store: RunStore, ref: str | None) -> int:
    if ref is None:
        targets = [c for r in store.runs() for c in r.checkpoints]
    else:
        name, step = parse_ref(ref)
        run = store.run(name)
        targets = [c for c in run.checkpoints if step is None or c.step == step]
        if step is not None and not targets:
            store.checkpoint(name, step)  # raises the "no checkpoint at step" message
    bad = 0
    for c in targets:
        try:
            verify_checkpoint(c.path)
            print(f"ok       {c.ref}")
        except CheckpointInvalid as exc:
            bad += 1
            print(f"INVALID  {c.ref}: {exc}")
    print(f"{len(targets) - bad} ok, {bad} invalid")
    return 1 if bad else 0


def _generate(store: RunStore, args: argparse.Namespace) -> int:
    from tui_trainer.engine.generate import generate_text

    name, step = parse_ref(args.ref)
    ckpt = store.checkpoint(name, step, purpose="generate from")
    print(generate_text(ckpt.path, args.prompt, args.max_new_tokens, args.seed))
    return 0


def _export(store: RunStore, args: argparse.Namespace) -> int:
    from tui_trainer.engine.export import export_checkpoint

    done = export_checkpoint(store, args.ref, args.dir, args.dtype, force=args.force)
    print(f"exported {done.ref} ({done.dtype}, {fmt.size(done.bytes)}) to {done.path}")
    return 0


def _print_config(config: Config) -> int:
    print(to_toml(config, with_docs=True), end="")
    return 0


def _version() -> str:
    from tui_trainer import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Headless training: the progress display (a rich bar on a terminal, plain lines otherwise, JSON with
--json) and the signals that pause a run (SIGINT, SIGTERM, SIGHUP)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from tui_trainer.core import fmt
from tui_trainer.core.store import RunStore, json_safe

if TYPE_CHECKING:
    pass


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
            text = text[:70] + "…" if len(text) > 70 else text
            self._line(f"step {event.step}  sample ({event.seconds:.2f}s): {text}")
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
        # the engine's eta_s counts to max_steps; its step time is the steady one (not the slow first step)
        eta = max(0, total - e.step) * (e.eta_step_time if e.eta_step_time is not None else e.step_time)
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
    from tui_trainer.control.server import ControlServer
    from tui_trainer.control.tee import Tee

    progress = _Progress(as_json, until_step=until_step)
    sink = Tee(progress)
    # pause/save/status from other processes. Served before the engine is imported (seconds) and through
    # data preparation, so `status RUN` finds this process and says what it is doing (the run dir's
    # control.sock link still waits until the run's lock is held: ControlServer)
    server = ControlServer(store.run_dir(plan.run), _StillStarting())
    try:
        server.start()
        sink.add(server.publish)
    except OSError as exc:  # training matters more than the channel: say so and go on without it
        print(f"tui-trainer: note: no control channel ({exc}); pause with Ctrl-C or SIGTERM", file=sys.stderr)
    try:
        from tui_trainer.core.events import State
        from tui_trainer.engine.trainer import Trainer

        trainer = Trainer(store, plan, sink, until_step=until_step, dist=dist)
    except BaseException:
        server.close()
        raise
    server.control = trainer
    restore = _install_signal_handlers(trainer.pause)
    try:
        state = trainer.run()
    finally:
        restore()
        server.close()  # clients see the final state, then EOF
        progress.close()
    # a fault (nan, disk, oom) pauses the run resumably, but the job did not do what was asked: exit 1
    return 1 if state == State.FAILED or trainer.failure is not None else 0


class _StillStarting:
    """The control surface until the Trainer exists: status is answered, commands are refused."""

    def _refuse(self) -> NoReturn:
        from tui_trainer.control.dispatch import Refused

        raise Refused("the run is still starting; try again in a moment")

    def pause(self) -> int:
        self._refuse()

    def save_now(self) -> None:
        self._refuse()

    def stop(self) -> None:
        self._refuse()


def _install_signal_handlers(pause: Callable[[], int]) -> Callable[[], None]:
    """SIGINT / SIGTERM / SIGHUP, and SIGUSR1 / SIGUSR2 (what Slurm's `--signal=USR1@90` sends before the
    time limit): finish the step, save, exit cleanly — a requeued `train --auto-resume` continues from there.
    A second SIGINT exits at once (the last complete checkpoint stays valid: checkpoints are renamed into
    place only when whole)."""
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

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
    previous = {s: signal.signal(s, handle) for s in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore

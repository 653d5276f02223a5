"""The branch dialog: a new run from a checkpoint with edited hyperparameters, validated before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from textual import events, on
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Button, Input, Label, Select, Static
from textual.worker import Worker, WorkerState

from tui_trainer.core.config import PRECISIONS, Config
from tui_trainer.core.errors import UserError
from tui_trainer.core.plan import RunPlan, branch_name, plan_branch
from tui_trainer.core.store import CheckpointInfo, RunStore, validate_run_name
from tui_trainer.tui.screens import dialog


@dataclass(frozen=True)
class Field:
    """One editable hyperparameter: the input's id, its label and the config key it sets."""

    id: str
    label: str
    key: str


FIELDS = (
    Field("lr", "learning rate", "optim.lr"),
    Field("batch_size", "batch size", "train.batch_size"),
    Field("grad_accum", "grad accumulation", "train.grad_accum"),
    Field("max_steps", "max steps", "train.max_steps"),
    Field("warmup_steps", "warmup steps", "optim.warmup_steps"),
)


COMPACT_BELOW_ROWS = 34


def _lookup(config: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return config.get(section, {}).get(name)


def suggest_lower_lr(config: dict[str, Any], factor: float = 0.5) -> dict[str, str]:
    """The branch dialog's prefill after a divergence: the same run with a smaller learning rate."""
    lr = _lookup(config, "optim.lr")
    return {"lr": repr(float(lr) * factor)} if isinstance(lr, (int, float)) else {}


def _keep_min_lr_below_lr(config: dict[str, Any], overrides: list[str]) -> list[str]:
    """Lowering lr under the parent's min_lr would be refused; cap min_lr with it (the decay floor
    follows the peak) unless the user set min_lr themselves."""
    lr = next((o.split("=", 1)[1] for o in overrides if o.startswith("optim.lr=")), None)
    min_lr = _lookup(config, "optim.min_lr")
    if lr is None or not isinstance(min_lr, (int, float)) or any(o.startswith("optim.min_lr=") for o in overrides):
        return overrides
    try:
        new_lr = float(lr)
    except ValueError:
        return overrides  # the config check names the bad lr
    return [*overrides, f"optim.min_lr={new_lr / 10!r}"] if 0 < new_lr < min_lr else overrides


def _show(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


class BranchScreen(dialog.FormScreen[RunPlan | None]):
    """Returns a validated RunPlan for the branch, or None when cancelled."""

    def __init__(
        self,
        store: RunStore,
        checkpoint: CheckpointInfo,
        config: dict[str, Any],
        suggest: dict[str, str] | None = None,
        note: str = "",
        ranks: int | None = None,
    ) -> None:
        """`suggest` prefills fields (by id) with values differing from the parent's, e.g. a lower lr
        after the loss went NaN; `note` says why, in the dialog's message line. `ranks`: the branch starts
        in the background (the app is attached to runs there) and gets a ranks field with this default."""
        super().__init__()
        self.store = store
        self.checkpoint = checkpoint
        self.config = config
        self.suggest = suggest or {}
        self.note = note
        self.defaults = {f.id: _show(_lookup(config, f.key)) for f in FIELDS}
        self.default_precision = str(_lookup(config, "train.precision") or "fp32")
        self.default_name = branch_name(store, checkpoint.run, checkpoint.step)
        self.default_ranks = ranks
        self.checking = False  # a plan is being verified on a worker thread

    def compose(self) -> ComposeResult:
        with Vertical(id="branch-dialog"):
            yield Static(f"Branch from [b]{self.checkpoint.ref}[/b]", id="branch-title")
            with Grid(id="branch-fields"):
                yield from dialog.field("run name", self.default_name, "name")
                for f in FIELDS:
                    yield from dialog.field(f.label, self.suggest.get(f.id, self.defaults[f.id]), f.id)
                if self.default_ranks is not None:
                    yield from dialog.field("ranks (processes)", str(self.default_ranks), "ranks")
                yield Label("precision")
                yield Select(
                    [(p, p) for p in PRECISIONS],
                    value=self.default_precision,
                    allow_blank=False,
                    id="precision",
                )
            # a note (why the dialog opened by itself) shows at once in the message line; errors replace it
            yield Static(self.note, id="branch-error", classes="-shown" if self.note else "")
            yield from dialog.buttons("branch", "Start branch", "start")

    def on_mount(self) -> None:
        dialog.dress(self, "branch", "Branch", "enter start · esc cancel", first="name")
        self._fit(self.app.size.height)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.height)

    def _fit(self, height: int) -> None:
        """Borderless one-line fields when the terminal is short (an 80x24 terminal fits the whole form)."""
        compact = height < COMPACT_BELOW_ROWS
        self.set_class(compact, "-compact")
        for widget in self.query("Input, Select, Button"):
            widget.compact = compact  # type: ignore[attr-defined]

    def overrides(self) -> list[str]:
        """`section.key=value` for every field the user changed (unchanged ones keep the parent's value)."""
        out = []
        for f in FIELDS:
            text = self.query_one(f"#{f.id}", Input).value.strip()
            if text != self.defaults[f.id]:
                if not text:
                    raise UserError(f"{f.key}: enter a value ({f.label})")
                out.append(f"{f.key}={text}")
        precision = self.query_one("#precision", Select).value
        if precision != self.default_precision:
            out.append(f"train.precision={precision}")
        return _keep_min_lr_below_lr(self.config, out)

    def ranks(self) -> int:
        """The processes the branch trains on: 1 in this process, or the ranks field when it has one."""
        if self.default_ranks is None:
            return 1
        text = self.query_one("#ranks", Input).value.strip()
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"ranks: {text!r} is not a number of processes (1 or more)")
        return int(text)

    def quick_check(self) -> tuple[str, list[str]]:
        """Everything that can be checked at once (name, settings); raises UserError naming the field."""
        name = self.query_one("#name", Input).value.strip()
        if not name:
            raise UserError("run name: enter a name for the new run")
        validate_run_name(name)
        if self.store.exists(name):
            raise UserError(f"run {name!r} already exists; pick another name")
        overrides = self.overrides()
        self.ranks()
        recorded = Config.from_dict(self.config, source=f"{self.checkpoint.ref} run.json", validate=False)
        recorded.with_overrides(overrides)  # raises ConfigError naming the key
        return name, overrides

    def show_error(self, message: str, busy: bool = False) -> None:
        dialog.show_message(self, "branch", message, busy)

    @on(Button.Pressed, "#start")
    @on(Input.Submitted)
    def action_start(self) -> None:
        if self.checking:
            return
        try:
            name, overrides = self.quick_check()
        except UserError as exc:
            self.show_error(str(exc))
            return
        # plan_branch re-hashes the checkpoint (sha256 of every file): seconds for a big model, so off the UI thread
        self.checking = True
        self.show_error(f"verifying {self.checkpoint.ref}…", busy=True)
        plan = partial(plan_branch, self.store, self.checkpoint.ref, name, overrides, self.ranks())
        self.run_worker(plan, name="plan branch", thread=True, exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.SUCCESS:
            self.dismiss(event.worker.result)
        elif event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.checking = False
            error = event.worker.error
            self.show_error(str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

"""Gradient norm and live samples while training: grad_norm on every logged step, samples that never change
the losses (bit for bit, across a resume too), samples.jsonl, and what the headless line shows."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch
from faults_support import nth_forward

from tui_trainer.cli.headless import _Progress
from tui_trainer.core.config import load_config
from tui_trainer.core.errors import ConfigError
from tui_trainer.core.events import Failed, SampleLogged, State, StepLogged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer


def train(store: RunStore, overrides: list[str], name: str, events=None, until_step=None, hooks=None) -> str:
    plan = plan_train(store, load_config(None, overrides), name)
    sink = events if callable(events) else events.append if events is not None else None
    return Trainer(store, plan, sink, until_step=until_step, hooks=hooks).run()


def logged(store: RunStore, run: str, key: str) -> dict[int, float]:
    """{step: value} of `key` as every reader sees it (resume markers applied)."""
    return {r["step"]: r[key] for r in store.metrics(run) if key in r}


def samples(store: RunStore, run: str) -> list[dict]:
    path = store.run_dir(run) / "samples.jsonl"
    """Every sample line as written (resume markers, which carry no text, left out; none superseded)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if "text" in r]


# ---------------------------------------------------------------- gradient norm


@pytest.mark.parametrize(("clip", "log_every"), [(0.01, 1), (0.0, 3)])
def test_grad_norm_is_logged_and_finite_on_every_logged_step(tmp_path, tiny, clip, log_every):
    """Clipping on: the pre-clip norm (above a tiny clip). Clipping off: measured at the log steps only."""
    store = RunStore(tmp_path / "runs")
    events: list = []
    overrides = tiny(optim__grad_clip=clip, train__log_every=log_every, train__sample_every=0)
    assert train(store, overrides, "g", events) == State.FINISHED
    norms = logged(store, "g", "grad_norm")
    assert sorted(norms) == sorted(logged(store, "g", "loss")) == [s for s in range(1, 13) if s % log_every == 0]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in norms.values()), norms
    if clip:
        assert all(v > clip for v in norms.values())  # what clipping saw, not what it left
    steps = [e for e in events if isinstance(e, StepLogged)]
    assert {e.step: e.grad_norm for e in steps} == norms


def test_grad_norm_with_clipping_off_measures_what_clipping_sees(tmp_path, tiny):
    """Step 1 has the same weights and batch either way, so the same gradient: the same norm."""
    store = RunStore(tmp_path / "runs")
    assert train(store, tiny(optim__grad_clip=1.0, train__max_steps=3), "on") == State.FINISHED
    assert train(store, tiny(optim__grad_clip=0.0, train__max_steps=3), "off") == State.FINISHED
    assert logged(store, "on", "grad_norm")[1] == logged(store, "off", "grad_norm")[1]


def nan_loss(out):
    out.loss = out.loss * float("nan")
    return out


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_detection_still_fires_first_on_the_loss(tmp_path, tiny, log_every):
    """A diverging run with grad norms and samples due every step: the loss check names the fault (a NAN
    pause at that step), not the NaN grad norm nor a sample from the diverged model."""
    store = RunStore(tmp_path / "runs")
    events: list = []
    overrides = tiny(train__sample_every=1, train__log_every=log_every, optim__grad_clip=0.0)
    assert train(store, overrides, "n", events, hooks=nth_forward(3, nan_loss)) == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "nan" and failed[0].step == 3
    assert "loss is nan" in failed[0].message and "step 3" in failed[0].message
    assert [s["step"] for s in samples(store, "n")] == [1, 2]  # nothing sampled from the diverged model
    if log_every == 1:
        last = json.loads(store.metrics_path("n").read_text().splitlines()[-1])
        assert last["step"] == 3 and last["loss"] is None and last["nonfinite"]["loss"] == "nan"


# ---------------------------------------------------------------- live samples


def test_samples_on_and_off_log_bit_identical_losses_across_a_resume(tmp_path, tiny):
    """Dropout is on (tiny), so a sample that drew from the global RNG or left the model in eval mode
    would change every later loss."""
    store = RunStore(tmp_path / "runs")
    on, off = tiny(train__sample_every=2), tiny(train__sample_every=0)
    assert train(store, off, "off") == State.FINISHED
    assert train(store, on, "on") == State.FINISHED
    assert train(store, on, "resumed", until_step=6) == State.PAUSED
    assert Trainer(store, plan_resume(store, "resumed")).run() == State.FINISHED
    reference = logged(store, "off", "loss")
    assert sorted(reference) == list(range(1, 13))
    assert logged(store, "on", "loss") == reference  # exact float equality, every step
    assert logged(store, "resumed", "loss") == reference
    assert (
        logged(store, "on", "eval_loss") == logged(store, "resumed", "eval_loss") == logged(store, "off", "eval_loss")
    )
    assert samples(store, "off") == []
    # the same weights and the same per-step generator: the resumed run samples the same text
    texts = {s["step"]: s["text"] for s in samples(store, "on")}
    assert list(texts) == [2, 4, 6, 8, 10, 12]
    assert {s["step"]: s["text"] for s in samples(store, "resumed")} == texts


def test_a_resume_in_place_supersedes_the_samples_of_the_lost_steps(tmp_path, tiny):
    """Killed after sampling step 6 but before checkpointing it: the resumed run samples step 6 again, and
    readers see each step's sample once, the new one (as with metrics.jsonl)."""
    store = RunStore(tmp_path / "runs")
    overrides = tiny(train__sample_every=2, checkpoint__every_steps=4, train__max_steps=8)
    assert train(store, overrides, "k", until_step=6) == State.PAUSED
    shutil.rmtree(store.checkpoint_dir("k", 6))  # as if the process died before writing it
    assert Trainer(store, plan_resume(store, "k")).run() == State.FINISHED
    assert [s["step"] for s in samples(store, "k")] == [2, 4, 6, 6, 8]  # the file is append-only
    shown = store.samples("k")
    assert [s["step"] for s in shown] == [2, 4, 6, 8]
    assert shown[2]["time"] > samples(store, "k")[2]["time"]  # step 6 is the resumed run's


def test_samples_jsonl_follows_eval_by_default_and_matches_the_events(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    events: list = []
    overrides = tiny(train__sample_prompt="ROMEO:", train__sample_tokens=8)  # eval_every=5, sample_every=-1
    assert train(store, overrides, "s", events) == State.FINISHED
    lines = samples(store, "s")
    assert [s["step"] for s in lines] == [5, 10]
    assert all(set(s) == {"step", "prompt", "text", "time", "seconds"} for s in lines)
    assert all(s["prompt"] == "ROMEO:" and s["text"] and s["seconds"] > 0 for s in lines)
    sampled = [e for e in events if isinstance(e, SampleLogged)]
    assert [(e.step, e.prompt, e.text, e.seconds) for e in sampled] == [
        (s["step"], s["prompt"], s["text"], s["seconds"]) for s in lines
    ]


def test_a_sample_leaves_the_global_rng_and_the_train_mode_alone(tmp_path, tiny):
    from tui_trainer.engine import sampling
    from tui_trainer.engine.data import prepare_data
    from tui_trainer.engine.model import build_model

    config = load_config(None, tiny())
    data = prepare_data(config, None, lambda *a: None)
    model = build_model(config, data.tokenizer, None).train()
    before = torch.get_rng_state()
    first = sampling.sample(model, data.tokenizer, step=3, prompt="", tokens=10, seed=1, autocast=None)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    again = sampling.sample(model, data.tokenizer, step=3, prompt="", tokens=10, seed=1, autocast=None)
    assert first.text == again.text and first.text


def test_sample_keys_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.sample_every"):
        load_config(None, ["train.sample_every=-2"])
    with pytest.raises(ConfigError, match=r"train\.sample_tokens"):
        load_config(None, ["train.sample_tokens=0"])


# ---------------------------------------------------------------- the headless line


def test_the_headless_line_shows_the_grad_norm_and_samples(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    out = io.StringIO()
    progress = _Progress(as_json=False, stream=out, tty=False)
    assert train(store, tiny(train__sample_every=6), "h", progress) == State.FINISHED
    text = out.getvalue()
    norms = logged(store, "h", "grad_norm")
    assert f"step 12/12  loss {logged(store, 'h', 'loss')[12]:.3f}  grad norm {norms[12]:.3f}" in text, text
    assert "step 6  sample (" in text and "step 12  sample (" in text, text
    # a StepLogged without a norm (an older run's) shows none
    quiet = io.StringIO()
    _Progress(as_json=False, stream=quiet, tty=False)(StepLogged("r", 1, 3.0, 1e-3, 10, 5.0, 0.1, 1, 0.0))
    assert "loss 3.000  " in quiet.getvalue() and "grad norm" not in quiet.getvalue()

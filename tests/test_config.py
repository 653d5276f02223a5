"""Config: TOML + --set overrides, and one clear error naming the key for anything wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from tui_trainer.core.config import Config, load_config
from tui_trainer.core.config_text import field_docs, markdown_table, to_toml
from tui_trainer.core.errors import ConfigError


def test_defaults_are_a_small_cpu_demo():
    c = Config().validate()
    assert (c.model.n_layer, c.model.n_embd, c.model.block_size) == (4, 128, 128)
    assert c.train.precision == "fp32" and c.train.device == "auto"


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.002\nbetas = [0.8, 0.9]\n[train]\nbatch_size = 8\n")
    c = load_config(path, ["train.batch_size=4", "train.precision=bf16", "data.path=corpus dir"])
    assert c.optim.lr == 0.002 and c.optim.betas == (0.8, 0.9)
    assert c.train.batch_size == 4 and c.train.precision == "bf16" and c.data.path == "corpus dir"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.n_layers=2", "model.n_layers"),
        ("trian.max_steps=2", "trian"),
        ("train.batch_size=two", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("train.precision=fp8", "train.precision"),
        ("train.parallel=zero3", "train.parallel"),
        ("model.n_head=3", "model.n_head"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("train.grad_checkpointing=maybe", "train.grad_checkpointing"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("noequals", "noequals"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert named in str(info.value)


def test_fsdp_takes_lora_adapters():
    config = load_config(None, ["model.pretrained=some-dir", "lora.r=8", "train.parallel=fsdp"])
    assert (config.train.parallel, config.lora.r) == ("fsdp", 8)


def test_bad_toml_file_is_one_clear_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim\nlr = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


@given(
    lr=st.floats(1e-6, 1.0),
    batch=st.integers(1, 512),
    layers=st.integers(1, 48),
    precision=st.sampled_from(["fp32", "bf16", "fp16"]),
)
def test_toml_round_trip(lr, batch, layers, precision, tmp_path_factory):
    c = load_config(
        None,
        [
            f"optim.lr={lr!r}",
            f"optim.min_lr={lr / 10!r}",
            f"train.batch_size={batch}",
            f"model.n_layer={layers}",
            f"train.precision={precision}",
        ],
    )
    path = tmp_path_factory.mktemp("rt") / "c.toml"
    path.write_text(to_toml(c))
    assert load_config(path) == c


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
        ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
        ("optim.lr=1e400", "optim.lr: must be a finite number, got inf"),
        ("optim.lr=1e9", "optim.lr: AdamW learning rates above 1 diverge; got 1e+09"),
        ("optim.min_lr=-inf", "optim.min_lr: must be a finite number"),
        ("optim.weight_decay=5.0", "optim.weight_decay: must be in [0, 1], got 5"),
        ("optim.betas=[0.9, nan]", "optim.betas: must be a finite number, got nan"),
        ("optim.grad_clip=inf", "optim.grad_clip: must be a finite number"),
        ("model.dropout=nan", "model.dropout: must be a finite number"),
        ("data.val_fraction=-0.1", "data.val_fraction: must be in [0, 0.5), got -0.1"),
        ("checkpoint.every_minutes=1e12", "checkpoint.every_minutes: must be in [0, 10080], got 1e+12"),
        ("optim.warmup_steps=2000", "optim.warmup_steps: 2000 is not below train.max_steps=2000"),
    ],
)
def test_impossible_numbers_are_refused_with_the_reason(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_a_warmup_nobody_set_follows_max_steps_and_one_given_is_checked_against_it(tmp_path):
    """Issue 19: `--set train.max_steps=12` was refused because the *default* warmup (50) is not below it."""
    assert load_config(None, ["train.max_steps=10"]).optim.warmup_steps == 1
    assert load_config(None, ["train.max_steps=3"]).optim.warmup_steps == 0
    assert load_config(None, ["train.max_steps=300"]).optim.warmup_steps == 30
    assert load_config(None, []).optim.warmup_steps == 50  # the demo's schedule is unchanged
    assert load_config(None, ["train.max_steps=10", "optim.warmup_steps=9"]).optim.warmup_steps == 9
    # a warmup that was given is never changed behind the user's back: --set, a file, or a run's record
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 50 is not below train\.max_steps=10"):
        load_config(None, ["optim.warmup_steps=50", "train.max_steps=10"])
    (tmp_path / "run.toml").write_text("[optim]\nwarmup_steps = 20\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 20 is not below train\.max_steps=12"):
        load_config(tmp_path / "run.toml", ["train.max_steps=12"])
    recorded = load_config(None, ["train.max_steps=500"]).to_dict()
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 50 is not below train\.max_steps=40"):
        Config.from_dict(recorded, validate=False).with_overrides(["train.max_steps=40"])
    # `config` says which warmup was derived
    derived = to_toml(load_config(None, ["train.max_steps=12"]), with_docs=True)
    assert "\nwarmup_steps = 1  # not set: derived from train.max_steps=12\n" in derived
    assert "derived" not in to_toml(load_config(None, ["optim.warmup_steps=5"]), with_docs=True)


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_config(tmp_path)  # a directory
    (tmp_path / "inf.toml").write_text("[optim]\nlr = inf\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: must be a finite number"):
        load_config(tmp_path / "inf.toml")


@given(lr=st.floats(1e-6, 1.0), decay=st.floats(0.0, 1.0))
def test_printed_config_is_standard_toml_that_reads_back(lr, decay):
    c = load_config(None, [f"optim.lr={lr!r}", f"optim.min_lr={lr / 10!r}", f"optim.weight_decay={decay!r}"])
    assert "Infinity" not in to_toml(c) and "NaN" not in to_toml(c)
    assert Config.from_dict(tomllib.loads(to_toml(c))) == c
    assert Config.from_dict(tomllib.loads(to_toml(c, with_docs=True))) == c  # the comments change nothing


def test_every_key_is_documented_and_the_documented_toml_puts_each_meaning_above_its_key():
    docs = {(section, name): doc for section, rows in field_docs().items() for name, _, doc in rows}
    assert all(doc.strip() for doc in docs.values())
    seen, section, comment = {}, "", ""
    for line in to_toml(Config(), with_docs=True).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("# "):
            comment = line[2:]
        elif " = " in line:
            seen[section, line.split(" = ")[0]] = comment
    assert seen == docs  # every key, each under its own meaning


def test_readme_configuration_table_is_the_generated_one():
    """The README table comes from the same field docs as `tui-trainer config`; regenerate it with
    markdown_table() when a key or its meaning changes."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme

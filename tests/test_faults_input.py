"""Bad input: exit code 2, one line naming the problem, no traceback, nothing written.

Complements tests/test_cli.py (unknown key, batch 0, lr 0, wrong int, missing/empty data path, path
separator in --run, a@x, unknown run, missing --config, block size > pretrained positions, unloadable
model, empty/tiny data, missing text column). Most cases call the CLI's main() in-process (the same
code path, without paying for a new interpreter each time); one runs the real process end to end."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from faults_support import cli, sets
from support.files import tree_digest

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_corpus) -> tuple[Path, Path]:
    """Run `a` (checkpoints 4, 8) trained on its own copy of the corpus; returns (runs dir, corpus)."""
    from conftest import tiny_overrides

    root = tmp_path_factory.mktemp("input")
    corpus = root / "corpus.txt"
    shutil.copy(small_corpus, corpus)
    store = RunStore(root / "runs")
    config = load_config(None, tiny_overrides(corpus))
    assert Trainer(store, plan_train(store, config, "a"), until_step=8).run() == State.PAUSED
    return store.root, corpus


@pytest.fixture(scope="module")
def mismatched_model(base, tmp_path_factory) -> Path:
    """A local model dir whose tokenizer (300 tokens) is bigger than its embedding table (100 rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("mismatch") / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(path)
    checkpoint = base[0] / "a" / "checkpoints" / "step-00000008"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, path / name)
    return path


def expect_refused(capsys, args: list[str], message: str, root: Path) -> None:
    before = tree_digest(root) if root.exists() else {}
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    # progress may have said "Starting ..." first; the problem itself is exactly one line, the last
    assert [line for line in err if "error" in line] == err[-1:] and err[-1].startswith("tui-trainer: error: "), err
    assert message in err[-1], err
    assert (tree_digest(root) if root.exists() else {}) == before, "bad input must write nothing"


TRAIN_CASES = {
    "negative lr": (["optim.lr=-0.001"], "optim.lr: must be > 0, got -0.001"),
    "zero block size": (["model.block_size=0"], "model.block_size: must be > 0"),
    "heads do not divide width": (["model.n_head=3"], "model.n_head: 3 does not divide model.n_embd=32"),
    "bool of the wrong type": (["train.compile='maybe'"], "train.compile: expected bool, got 'maybe'"),
    "unknown precision": (["train.precision='fp8'"], "train.precision: must be one of fp32, bf16, fp16"),
    "unknown section": (["optimizer.lr=0.1"], "optimizer.lr: unknown config section"),
    "no equals sign": (["optim.lr"], "optim.lr: expected section.key=value"),
    "dropout out of range": (["model.dropout=1.5"], "model.dropout: must be in [0, 1)"),
    "vocab below byte level": (["model.vocab_size=100"], "model.vocab_size: a byte-level BPE needs at least 257"),
    "empty data dir": (["data.path=EMPTY_DIR"], "holds no .txt, .jsonl or .parquet files"),
    "glob matching nothing": (["data.path=NO_MATCH"], "matches no files"),
    "unsupported file type": (["data.path=CSV"], "data.path: unsupported file type '.csv'"),
    "batch bigger than the data": (["train.batch_size=100000"], "train.batch_size: 100000 is more than the"),
    "not a model dir": (["model.pretrained=EMPTY_DIR"], "config.json is missing: not a Hugging Face model dir"),
    "infinite lr": (["optim.lr=1e400"], "optim.lr: must be a finite number, got inf"),
    "lr far too large": (["optim.lr=1e9"], "optim.lr: AdamW learning rates above 1 diverge; got 1e+09"),
    "warmup as long as the run": (["optim.warmup_steps=12"], "optim.warmup_steps: 12 is not below train.max_steps=12"),
    "fp16 on the CPU": (["train.precision='fp16'", "train.device='cpu'"], "train.precision=fp16 needs a GPU"),
    "unknown encoding": (["data.encoding=klingon"], "data.encoding: unknown encoding 'klingon'"),
    "tokenizer bigger than the model": (
        ["model.pretrained=MISMATCH"],
        "model.vocab_size: the tokenizer has 300 tokens but the model only 100 embeddings",
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_input(tmp_path, tiny, capsys, mismatched_model, case):
    extra, message = TRAIN_CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    subs = {
        "EMPTY_DIR": str(tmp_path / "empty"),
        "NO_MATCH": str(tmp_path / "*.parquet"),
        "CSV": str(tmp_path / "rows.csv"),
        "MISMATCH": str(mismatched_model),
    }
    extra = [f"{k}={subs[v]!r}" if v in subs else f"{k}={v}" for k, _, v in (e.partition("=") for e in extra)]
    extra = [e[:-1] if e.endswith("=") else e for e in extra]
    runs = tmp_path / "runs"
    expect_refused(
        capsys, ["train", "--run", "x", "--headless", "--runs-dir", str(runs), *sets([*tiny(), *extra])], message, runs
    )
    assert not (runs / "x").exists()


def test_text_that_is_not_utf8_is_named_with_its_byte_and_reads_with_data_encoding(
    tmp_path, tiny, small_corpus, capsys
):
    text = small_corpus.read_text()
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes((text[:5000] + "Café, naïve façade.\n" + text[5000:]).encode("latin-1"))
    runs = tmp_path / "runs"
    args = ["train", "--run", "x", "--headless", "--runs-dir", str(runs), *sets(tiny(data__path=str(corpus)))]
    # 5000 ASCII characters, then "Caf": the é is byte 5003
    message = f"{corpus} is not valid utf-8 at byte 5003; set data.encoding (e.g. latin-1)"
    expect_refused(capsys, args, message, runs)
    assert not runs.exists()
    assert main([*args, "--until-step", "1", "--set", "data.encoding='latin-1'"]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(RunStore(runs).checkpoint("x", None).path)
    assert tokenizer.decode(tokenizer("Café, naïve façade.")["input_ids"]) == "Café, naïve façade."


def test_jsonl_that_is_not_utf8_is_named_with_its_byte(tmp_path, tiny, small_corpus, capsys):
    # pyarrow reads such JSON without complaint; the bad bytes surface only when the text is used
    docs = [json.dumps({"text": part}, ensure_ascii=False) for part in small_corpus.read_text().split("\n\n")]
    docs[3] = json.dumps({"text": "Café"}, ensure_ascii=False)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_bytes("\n".join(docs).encode("latin-1"))
    offset = len("\n".join(docs[:3]).encode()) + 1 + len('{"text": "Caf')
    runs = tmp_path / "runs"
    args = ["train", "--run", "x", "--headless", "--runs-dir", str(runs), *sets(tiny(data__path=str(corpus)))]
    expect_refused(capsys, args, f"{corpus} is not valid utf-8 at byte {offset}; set data.encoding", runs)


EXISTING_RUN_CASES = {
    "resume into more layers": (["resume", "a", "--set", "model.n_layer=3"], "model.n_layer: cannot change the model"),
    "branch into a wider model": (
        ["branch", "a@4", "--set", "model.n_embd=64", "--set", "model.n_head=2"],
        "model.n_embd: cannot change the model's shape",
    ),
    "resume with a longer context": (["resume", "a@4", "--set", "model.block_size=64"], "model.block_size: cannot"),
    "resume with a bad value": (["resume", "a", "--set", "optim.lr=-1"], "optim.lr: must be > 0"),
    "no such checkpoint": (["resume", "a@99"], "run 'a' has no checkpoint at step 99 (checkpoints: 4, 8)"),
    "empty step": (["resume", "a@"], "expected RUN or RUN@STEP"),
    "double at": (["resume", "a@@4"], "expected RUN or RUN@STEP"),
    "no run before the at": (["branch", "@4"], "run name ''"),
    "branch name with a path": (["branch", "a@4", "--run", "x/y"], "must not contain a path separator"),
    "run name escaping the runs dir": (["train", "--run", "../escape"], "must not contain a path separator"),
    "branch onto an existing run": (["branch", "a@4", "--run", "a"], "run 'a' already exists"),
    "train an existing run": (["train", "--run", "a"], "run 'a' already exists"),
    "branch that ends before it starts": (
        ["branch", "a@8", "--set", "train.max_steps=4"],
        "train.max_steps: 4 is not past the starting step 8 of a@8",
    ),
    "resume a run at its max_steps": (
        ["resume", "a", "--set", "train.max_steps=8"],
        "train.max_steps: 8 is not past the starting step 8 of a@8",
    ),
    "resume fp16 on the CPU": (
        ["resume", "a", "--set", "train.precision='fp16'", "--set", "train.device='cpu'"],
        "train.precision=fp16 needs a GPU; on the CPU use bf16 or fp32",
    ),
    "negative until-step": (["resume", "a", "--until-step", "-1"], "--until-step: must be >= 0, got -1"),
}


@pytest.mark.parametrize("case", list(EXISTING_RUN_CASES))
def test_bad_input_against_an_existing_run(base, capsys, tiny, case):
    args, message = EXISTING_RUN_CASES[case]
    root, _ = base
    if args[0] == "train":
        args = [*args, *sets(tiny())]
    expect_refused(capsys, [*args, "--headless", "--runs-dir", str(root)], message, root)


def test_resuming_when_the_data_is_gone_is_refused(base, capsys):
    root, corpus = base
    moved = corpus.with_suffix(".away")
    corpus.rename(moved)
    try:
        expect_refused(
            capsys,
            ["resume", "a", "--headless", "--runs-dir", str(root)],
            f"data.path: no such file or directory: {corpus}",
            root,
        )
    finally:
        moved.rename(corpus)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "a@4", "--max-new-tokens", "0"], "--max-new-tokens: must be > 0"),
        (["verify", "nosuch"], "no run named 'nosuch'"),
        (["generate", "a@5"], "run 'a' has no checkpoint at step 5"),
    ],
)
def test_bad_input_to_browsing_commands(base, capsys, args, message):
    root, _ = base
    expect_refused(capsys, [*args, "--runs-dir", str(root)], message, root)


@pytest.mark.slow
def test_the_real_process_prints_one_clean_line(tmp_path, tiny, mismatched_model):
    """End to end in a fresh interpreter: no library warning or traceback leaks around the one line."""
    out = cli(
        "train",
        "--run",
        "x",
        "--headless",
        *sets([*tiny(), f"model.pretrained={str(mismatched_model)!r}"]),
        cwd=tmp_path,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("tui-trainer: error: model.vocab_size: the tokenizer has 300 tokens"), out.stderr
    # before it, only progress: the run starting and its data-preparation stages
    progress = re.compile(r"^(Starting x|(reading|training tokenizer|tokenizing) \d+%)")
    assert all(progress.match(line) for line in lines[:-1]), out.stderr
    assert out.stdout == "" and not (tmp_path / "runs").exists()

"""Data preparation: the model's vocabulary follows the trained tokenizer, trained tokenizers are cached by
corpus and settings, each stage reports progress, and the text encoding is the user's to set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tui_trainer.core.config import load_config
from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.data import first_undecodable_byte, prepare_data
from tui_trainer.engine.tokenizer import padded_vocab
from tui_trainer.engine.trainer import Trainer


def stages(corpus: Path, tiny, tokenizers: list | None = None, **extra: object) -> list[tuple[str, int, int | None]]:
    """prepare_data on `corpus` with the tiny settings; the (stage, done, total) reports it made."""
    heard: list[tuple[str, int, int | None]] = []
    config = load_config(None, tiny(data__path=str(corpus), **extra))
    data = prepare_data(config, None, lambda stage, done, total: heard.append((stage, done, total)))
    if tokenizers is not None:
        tokenizers.append(data.tokenizer.backend_tokenizer.to_str())
    return heard


def trained_tokenizer(heard: list[tuple[str, int, int | None]]) -> bool:
    return any(stage == "training tokenizer" for stage, _, _ in heard)


def test_model_vocab_follows_the_tokenizer_padded_and_the_run_says_so(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(model__vocab_size=50257))
    events: list = []
    assert Trainer(store, plan_train(store, config, "v"), events.append, until_step=4).run() == State.PAUSED
    ckpt = store.checkpoint("v", None).path
    learned = len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"])
    model_vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert learned < 50257 and model_vocab == padded_vocab(learned) and model_vocab % 64 == 0
    assert model_vocab - learned < 64
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert f"the tokenizer learned {learned:,} tokens; the model's vocabulary is {model_vocab:,} (asked 50,257)" in (
        notices
    )
    # run.json keeps what the user asked; resuming compares that, so the padded model resumes in place
    assert store.read_record("v")["config"]["model"]["vocab_size"] == 50257
    plan = plan_resume(store, "v")
    assert not plan.new_run and plan.run == "v"
    assert Trainer(store, plan).run() == State.FINISHED


def test_a_pretrained_models_vocab_is_never_changed(tmp_path, tiny, small_corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tui_trainer.core.sources import resolve_source
    from tui_trainer.engine.data import load_texts
    from tui_trainer.engine.tokenizer import train_tokenizer

    pretrained = tmp_path / "pretrained"
    tokenizer = train_tokenizer(load_texts(resolve_source(str(small_corpus)), "text"), 300)
    # 1000 rows: more than the tokenizer's 300 and not a multiple of 64, so any "following" would show
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        pretrained
    )
    tokenizer.save_pretrained(pretrained)
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(model__pretrained=str(pretrained)))
    assert Trainer(store, plan_train(store, config, "ft"), until_step=2).run() == State.PAUSED
    ckpt = store.checkpoint("ft", None).path
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 1000


def test_tokenizer_is_trained_once_per_corpus_and_vocab_size(tmp_path, tiny, small_corpus):
    corpus = tmp_path / "corpus.txt"  # its own path: no other test can have warmed the cache for it
    shutil.copy(small_corpus, corpus)
    made: list[str] = []
    assert trained_tokenizer(stages(corpus, tiny, made))
    assert not trained_tokenizer(stages(corpus, tiny, made)), "same corpus and vocab: the cached tokenizer is reused"
    assert made[0] == made[1], "the reused tokenizer is the one trained"
    assert trained_tokenizer(stages(corpus, tiny, model__vocab_size=400)), "another vocab size trains anew"
    with corpus.open("a") as f:
        f.write("\nA new line the old tokenizer never saw.\n")
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert trained_tokenizer(stages(corpus, tiny)), "a changed corpus trains anew"


def test_every_stage_reports_start_progress_and_end(tmp_path, tiny, small_corpus):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(small_corpus, corpus)
    heard = stages(corpus, tiny)
    order = list(dict.fromkeys(stage for stage, _, _ in heard))
    assert order == ["reading", "training tokenizer", "tokenizing"]
    for stage in order:
        reports = [(done, total) for s, done, total in heard if s == stage]
        assert reports[0][0] == 0, stage
        done, total = reports[-1]
        assert total is not None and done == total > 0, stage
        assert [d for d, _ in reports] == sorted(d for d, _ in reports), f"{stage} went backwards"
        assert all(d < total for d, _ in reports[:-1]), f"{stage} claimed done before it ended"
    assert heard[:2] == [
        ("reading", 0, corpus.stat().st_size),
        ("reading", corpus.stat().st_size, corpus.stat().st_size),
    ]


@pytest.mark.parametrize("at", [0, 5, (1 << 20) - 1, (1 << 20) + 3])
def test_first_undecodable_byte_is_exact_across_read_chunks(tmp_path, at):
    # 'é' is two bytes in utf-8: placing them across the 1 MB read boundary must not count as an error
    good = ("x" * ((1 << 20) - 1) + "é" + "y" * 10).encode()
    path = tmp_path / "t.txt"
    assert (path.write_bytes(good), first_undecodable_byte(str(path), "utf-8"))[1] is None
    bad = good[:at] + b"\xff" + good[at:]
    path.write_bytes(bad)
    assert first_undecodable_byte(str(path), "utf-8") == at
    assert first_undecodable_byte(str(path), "latin-1") is None


def test_files_of_another_type_in_a_data_dir_are_named_not_silently_skipped(tmp_path, tiny, small_corpus, capsys):
    """Issue 19: a data dir holding .png/.csv files trained on the text files and said nothing of the rest."""
    from tui_trainer.cli import main

    corpus = tmp_path / "corpus"
    (corpus / "figures").mkdir(parents=True)
    shutil.copy(small_corpus, corpus / "plays.txt")
    (corpus / "prices.csv").write_text("date,price\n2024-01-01,3\n")
    (corpus / "figures" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (corpus / ".DS_Store").write_bytes(b"\0")  # hidden files are never data: not worth a word
    args = ["train", "--run", "d", "--until-step", "1", "--headless", "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, *[a for o in tiny(data__path=str(corpus)) for a in ("--set", o)]]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: data.path")]
    assert notes == [
        "note: data.path: skipped 2 files that are not .txt, .jsonl or .parquet: figures/loss.png, prices.csv"
    ]

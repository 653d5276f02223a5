"""Shared fixtures: an offline, isolated Hugging Face cache and a tiny model on a slice of the corpus."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports datasets/transformers: they read these at import time.
_CACHE = Path(tempfile.mkdtemp(prefix="tui-trainer-hf-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_CACHE)
os.environ["HF_DATASETS_CACHE"] = str(_CACHE / "datasets")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "sample_data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~100 KB of tinyshakespeare: enough blocks for a tiny model, fast to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(CORPUS.read_bytes()[:100_000])
    return path


def tiny_overrides(corpus: Path, **extra: object) -> list[str]:
    """A model that trains a step in milliseconds on 2 CPU cores."""
    settings: dict[str, object] = {
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "model.vocab_size": 300,
        "model.dropout": 0.1,
        "train.batch_size": 4,
        "train.max_steps": 12,
        "optim.warmup_steps": 2,  # must stay below train.max_steps
        "train.eval_every": 5,
        "train.eval_batches": 2,
        "checkpoint.every_steps": 4,
        "checkpoint.every_minutes": 0,
        "data.path": str(corpus),
    }
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v if not isinstance(v, str) else repr(v)}" for k, v in settings.items()]


@pytest.fixture
def tiny(small_corpus: Path):
    """tiny(**extra) -> list of --set overrides for the tiny model (keys with '__' for '.')."""
    return lambda **extra: tiny_overrides(small_corpus, **extra)


@pytest.fixture(scope="session")
def family_tokenizer(small_corpus: Path):
    """A byte-level BPE trained here on the small corpus: the tokenizer of the tiny pretrained dirs."""
    from tui_trainer.core.sources import resolve_source
    from tui_trainer.engine.data import load_texts
    from tui_trainer.engine.tokenizer import train_tokenizer

    return train_tokenizer(load_texts(resolve_source(str(small_corpus)), "text"), 300)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, family_tokenizer) -> dict[str, Path]:
    """{model_type: a tiny pretrained dir} for llama, qwen2 and gpt_neox, built once per session."""
    from support.models import FAMILIES, make_model_dir

    root = tmp_path_factory.mktemp("families")
    return {name: make_model_dir(root / name, name, family_tokenizer) for name in FAMILIES}


# ---------------------------------------------------------------- no process outlives its test


@pytest.fixture(autouse=True)
def _processes_die_with_the_test(request: pytest.FixtureRequest):
    """Kill what the test started (support.procs groups, and anything running in its tmp dir, such as a
    `--detach`ed trainer) when it ends, passed or failed."""
    from support import procs

    workdir = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    before = procs.started()
    yield
    procs.reap(procs.started() - before)
    if workdir is not None:
        procs.reap_under(workdir)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """At the end of the session — a Ctrl-C too — every group still registered, and anything still running
    in the session's tmp dirs (module fixtures' processes, a test interrupted half-way)."""
    from support import procs

    procs.reap()
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        with contextlib.suppress(Exception):
            procs.reap_under(factory.getbasetemp())

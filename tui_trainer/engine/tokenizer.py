"""The tokenizer: a GPT-2-style byte-level BPE trained on the corpus and cached by the rows it was trained on,
or one loaded from a model dir; and how text is chunked for it (ARCHITECTURE.md: the engine).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.engine.stage_progress import ProgressFn, StageProgress

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token
VOCAB_MULTIPLE = 64  # embedding rows are padded to this, as nanoGPT pads 50257 to 50304 (faster matmuls)
LINES_PER_CHUNK = 64  # plain-text lines joined per tokenizer call: per-line calls cost ~5x in overhead
MAP_BATCH_ROWS = 4096  # rows per batch, for training the tokenizer and for the tokenizing map
# Changing how a tokenizer is trained or text is tokenized must change this, so old cache entries miss.
TOKENIZER_RECIPE = "byte-level BPE v2: GPT-2 pre-tokenizer, <|endoftext|> special, 64-line chunks"


def padded_vocab(n_tokens: int) -> int:
    """The model's vocabulary for a tokenizer of n_tokens: rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def chunk_texts(texts: list[str], joined: bool) -> list[str]:
    """What one tokenizer call sees: LINES_PER_CHUNK lines of a plain-text file joined (a .txt file is one
    document, so its lines need not be tokenized apart), or one document per row."""
    if not joined:
        return texts
    return ["".join(texts[i : i + LINES_PER_CHUNK]) for i in range(0, len(texts), LINES_PER_CHUNK)]


def _wrap_tokenizer(tok: Any) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, model_max_length=1 << 30
    )


def train_tokenizer(
    texts: Dataset, vocab_size: int, *, joined: bool = True, progress: ProgressFn | None = None
) -> PreTrainedTokenizerBase:
    """A GPT-2-style byte-level BPE trained on the corpus with `tokenizers` (seconds on tinyshakespeare)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"model.vocab_size: a byte-level BPE needs at least {MIN_BPE_VOCAB}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stage = StageProgress(progress, "training tokenizer", len(texts))

    def batches() -> Iterator[list[str]]:
        for start in range(0, len(texts), MAP_BATCH_ROWS):
            yield chunk_texts(texts[start : start + MAP_BATCH_ROWS]["text"], joined)
            stage.update(start + MAP_BATCH_ROWS)

    tok.train_from_iterator(batches(), trainer=trainer)
    stage.end()
    return _wrap_tokenizer(tok)


def tokenizer_cache_dir() -> Path:
    """Trained tokenizers live beside datasets' own cache (HF_DATASETS_CACHE), so clearing one clears both."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tui_trainer" / "tokenizers"


def tokenizer_cache_key(rows: Dataset, vocab_size: int, joined: bool) -> str:
    """datasets' fingerprint of the training rows identifies the corpus: it covers the files (path, size and
    modification time), the encoding and the split, costs nothing to read, and is what datasets itself uses
    to decide whether to re-read the files, so a cached tokenizer is never staler than the rows it serves."""
    key = f"{rows._fingerprint}|{vocab_size}|{joined}|{TOKENIZER_RECIPE}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def cached_tokenizer(
    rows: Dataset, vocab_size: int, *, joined: bool, progress: ProgressFn | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer trained earlier on exactly these rows with these settings, else train and cache it."""
    from tokenizers import Tokenizer

    path = tokenizer_cache_dir() / f"{tokenizer_cache_key(rows, vocab_size, joined)}.json"
    if path.is_file():
        try:
            return _wrap_tokenizer(Tokenizer.from_file(str(path)))
        except Exception:  # a damaged entry is retrained and overwritten below
            pass
    tokenizer = train_tokenizer(rows, vocab_size, joined=joined, progress=progress)
    try:  # write-then-rename: a concurrent or killed writer never leaves a half file under the real name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.backend_tokenizer.save(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run a retrain
    return tokenizer


def load_tokenizer(path: str, what: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model dir; `what` names the setting for the error message."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(
            f"{what}: cannot load {path!r} (only local dirs and cached models load offline): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    # A dir without tokenizer files (an HF Trainer checkpoint whose script passed no processing_class) still
    # "loads": transformers builds an empty tokenizer from config.json's model_type, which turns any corpus
    # into zero tokens ("smaller than one block"). Say what is missing instead.
    if len(tokenizer) < 2 or not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"{what}: {path} has no tokenizer (no tokenizer.json or vocab.json in it); save the one the model "
            f"was trained with there: tokenizer.save_pretrained({str(path)!r}) (an HF Trainer saves it in each "
            "checkpoint when given processing_class=tokenizer)"
        )
    return tokenizer

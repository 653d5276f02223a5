"""Data: load text with `datasets`, get a tokenizer (train a byte-level BPE or load one), tokenize with a
cached `map`, pack into block_size blocks, and sample them in an order that is a pure function of
(seed, epoch) so that resume seeks straight to its cursor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tui_trainer.config import Config, ConfigError, UserError
from tui_trainer.engine.sources import DataSource, resolve_source

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token


def load_texts(source: DataSource, text_column: str) -> Dataset:
    """Rows with a 'text' column. Plain .txt files are read line by line with the newlines kept."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.builder == "text":
            ds = datasets.load_dataset("text", data_files=list(source.files), split="train", keep_linebreaks=True)
        elif source.builder == "hub":
            ds = datasets.load_dataset(source.hub_name, split="train")
        else:
            ds = datasets.load_dataset(source.builder, data_files=list(source.files), split="train")
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = " (no network here: only local files and cached datasets load)" if source.builder == "hub" else ""
        raise UserError(f"data.path: cannot load {source.describe!r}{offline}: {detail}") from None
    except Exception as exc:  # datasets raises its own DatasetGenerationError etc. for malformed files
        raise UserError(f"data.path: cannot read {source.describe!r}: {str(exc).splitlines()[0]}") from None
    column = "text" if source.builder == "text" else text_column
    if column not in ds.column_names:
        raise ConfigError(
            f"data.text_column: no column {column!r} in {source.describe} (columns: {', '.join(ds.column_names)})"
        )
    if column != "text":
        ds = ds.rename_column(column, "text")
    extra = [c for c in ds.column_names if c != "text"]
    return ds.remove_columns(extra) if extra else ds


def split_rows(ds: Dataset, val_fraction: float) -> tuple[Dataset, Dataset | None]:
    """Hold out the last val_fraction of rows: contiguous, deterministic, no leakage across a shuffle."""
    n_val = int(len(ds) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(ds) > 1:
        n_val = 1
    if n_val == 0:
        return ds, None
    return ds.select(range(len(ds) - n_val)), ds.select(range(len(ds) - n_val, len(ds)))


def train_tokenizer(texts: Dataset, vocab_size: int) -> PreTrainedTokenizerBase:
    """A GPT-2-style byte-level BPE trained on the corpus with `tokenizers` (seconds on tinyshakespeare)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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

    def batches() -> Iterator[list[str]]:
        for start in range(0, len(texts), 1000):
            yield texts[start : start + 1000]["text"]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, model_max_length=1 << 30
    )


def load_tokenizer(path: str, what: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model dir; `what` names the setting for the error message."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(
            f"{what}: cannot load {path!r} (only local dirs and cached models load offline): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def tokenize_to_array(ds: Dataset, tokenizer: PreTrainedTokenizerBase, *, add_eos: bool, num_proc: int) -> np.ndarray:
    """Tokenize with a cached, batched `map` (reused across runs with the same tokenizer) and flatten."""
    import pyarrow.compute as pc

    eos_id = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if add_eos and eos_id is not None:
            ids = [[*row, eos_id] for row in ids]
        return {"ids": ids}

    # tokenizers parallelism inside datasets' worker processes deadlocks after fork
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if num_proc > 1 else "true")
    tokenized = ds.map(
        encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None
    )
    flat = pc.list_flatten(tokenized.data.column("ids"))
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int64)


def pack(tokens: np.ndarray, block_size: int) -> torch.Tensor:
    """Cut the token stream into (n_blocks, block_size); the ragged tail is dropped."""
    n_blocks = len(tokens) // block_size
    return torch.from_numpy(tokens[: n_blocks * block_size].copy()).view(n_blocks, block_size)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    train: torch.Tensor  # (n_blocks, block_size) int64
    val: torch.Tensor | None
    source: DataSource
    notes: list[str]


def prepare_data(config: Config, tokenizer: PreTrainedTokenizerBase | None) -> PreparedData:
    """Everything the loop needs from the corpus; trains a tokenizer when none is given."""
    source = resolve_source(config.data.path)
    texts = load_texts(source, config.data.text_column)
    if len(texts) == 0:
        raise UserError(f"data.path: {source.describe} has no rows")
    train_rows, val_rows = split_rows(texts, config.data.val_fraction)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_rows, config.model.vocab_size)
    add_eos = source.builder != "text"  # documents get an end-of-text; a .txt file is one document
    block = config.model.block_size
    train = pack(tokenize_to_array(train_rows, tokenizer, add_eos=add_eos, num_proc=config.data.num_proc), block)
    notes = []
    if len(train) == 0:
        raise UserError(f"data.path: {source.describe} is smaller than one block of model.block_size={block} tokens")
    if len(train) < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is more than the {len(train)} blocks of "
            f"{block} tokens in {source.describe}; lower it or add data"
        )
    val = None
    if val_rows is not None:
        val = pack(tokenize_to_array(val_rows, tokenizer, add_eos=add_eos, num_proc=config.data.num_proc), block)
        if len(val) == 0:
            notes.append("the validation split is smaller than one block: eval is off")
            val = None
    return PreparedData(tokenizer=tokenizer, train=train, val=val, source=source, notes=notes)


class BlockSampler:
    """Batches of block indices. Epoch e's order is randperm(seed, e), so the cursor (epoch, position)
    is the whole sampler state and seeking is one permutation away, never a skip through batches."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int) -> None:
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_blocks, generator=generator)

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._order = epoch, position, None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def next_indices(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n_blocks:  # drop the ragged end of an epoch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        start = self.position
        self.position += self.batch_size
        return self._order[start : self.position]

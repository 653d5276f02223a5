"""The corpus: load text with `datasets`, hold out the validation rows, tokenize with a cached `map` and pack
into block_size blocks. The tokenizer is engine/tokenizer.py's, the sampling order engine/sampler.py's.

Each preparation stage reports progress through an optional callback (stage, done, total).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.core.sources import DataSource, resolve_source
from tui_trainer.engine.stage_progress import ProgressFn, StageProgress
from tui_trainer.engine.tokenizer import MAP_BATCH_ROWS, TOKENIZER_RECIPE, cached_tokenizer, chunk_texts, padded_vocab

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


def first_undecodable_byte(path: str, encoding: str) -> int | None:
    """Offset of the first byte of `path` that does not decode as `encoding`, or None; reads 1 MB at a time."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes held back from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            if not chunk:
                return None
            offset += len(chunk)


def _encoding_problem(source: DataSource, encoding: str) -> str | None:
    """One line naming the first file that is not in `encoding` and where, or None."""
    if source.builder not in ("text", "json"):
        return None
    for path in source.files:
        offset = first_undecodable_byte(path, encoding)
        if offset is not None:
            return f"{path} is not valid {encoding} at byte {offset}; set data.encoding (e.g. latin-1)"
    return None


def load_texts(source: DataSource, text_column: str, encoding: str = "utf-8") -> Dataset:
    """Rows with a 'text' column. Plain .txt files are read line by line with the newlines kept."""
    import datasets

    datasets.disable_progress_bars()
    # only a non-default encoding goes into the builder config: the default keeps datasets' cache name
    by_encoding: dict[str, Any] = {} if codecs.lookup(encoding).name == "utf-8" else {"encoding": encoding}
    try:
        if source.builder == "text":
            ds = datasets.load_dataset(
                "text", data_files=list(source.files), split="train", keep_linebreaks=True, **by_encoding
            )
        elif source.builder == "hub":
            ds = datasets.load_dataset(source.hub_name, split="train")
        else:
            kwargs = by_encoding if source.builder == "json" else {}
            ds = datasets.load_dataset(source.builder, data_files=list(source.files), split="train", **kwargs)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = " (no network here: only local files and cached datasets load)" if source.builder == "hub" else ""
        raise UserError(
            _encoding_problem(source, encoding) or f"data.path: cannot load {source.describe!r}{offline}: {detail}"
        ) from None
    except Exception as exc:  # datasets raises its own DatasetGenerationError etc. for malformed files
        problem = _encoding_problem(source, encoding)  # its message names neither the file nor the byte
        raise UserError(problem or f"data.path: cannot read {source.describe!r}: {str(exc).splitlines()[0]}") from None
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


def _batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """Token ids per text; a fast tokenizer's encode_batch_fast (parallel, no offsets) when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers < 0.20 lacks _fast
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else Hasher.hash(tokenizer)


def tokenize_to_array(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    add_eos: bool,
    num_proc: int,
    joined: bool = False,
    stage: StageProgress | None = None,
    done_before: int = 0,
) -> np.ndarray:
    """Tokenize with a cached, batched `map` (reused across runs with the same rows and tokenizer) into one
    int32 array per batch, and flatten (int32). The map's fingerprint is ours, so the function is never hashed."""
    import pyarrow.compute as pc

    eos_id = tokenizer.eos_token_id
    encode = _batch_encoder(tokenizer)
    fingerprint = hashlib.sha256(
        f"{ds._fingerprint}|{_tokenizer_digest(tokenizer)}|{add_eos}|{joined}|{TOKENIZER_RECIPE}".encode()
    ).hexdigest()[:32]
    report = stage.update if stage is not None and num_proc <= 1 else None  # worker processes cannot report
    done = [done_before]

    def encode_batch(batch: dict[str, list[str]]) -> dict[str, Any]:
        rows = encode(chunk_texts(batch["text"], joined))
        if add_eos and eos_id is not None:
            rows = [[*row, eos_id] for row in rows]
        if report is not None:
            done[0] += len(batch["text"])
            report(done[0])
        return {"ids": [np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32)]}

    # tokenizers parallelism inside datasets' worker processes deadlocks after fork
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if num_proc > 1 else "true")
    tokenized = ds.map(
        encode_batch,
        batched=True,
        batch_size=MAP_BATCH_ROWS,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fingerprint,
    )
    flat = pc.list_flatten(tokenized.data.column("ids"))
    return flat.to_numpy(zero_copy_only=False)  # int32; pack() widens it in its one copy


def pack(tokens: np.ndarray, block_size: int) -> torch.Tensor:
    """Cut the token stream into (n_blocks, block_size) int64; the ragged tail is dropped."""
    n_blocks = len(tokens) // block_size
    return torch.from_numpy(tokens[: n_blocks * block_size].astype(np.int64)).view(n_blocks, block_size)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    train: torch.Tensor  # (n_blocks, block_size) int64
    val: torch.Tensor | None
    source: DataSource
    notes: list[str]


def _read(config: Config, source: DataSource, progress: ProgressFn | None) -> Dataset:
    """Load the rows; the "reading" stage counts bytes of local files (rows for a hub dataset)."""
    size = sum(os.path.getsize(f) for f in source.files) if source.files else None
    stage = StageProgress(progress, "reading", size)
    texts = load_texts(source, config.data.text_column, config.data.encoding)
    stage.end(size if size is not None else len(texts))
    return texts


def prepare_data(
    config: Config, tokenizer: PreTrainedTokenizerBase | None, progress: ProgressFn | None = None
) -> PreparedData:
    """Everything the loop needs from the corpus; trains (or reuses a cached) tokenizer when none is given.
    `progress(stage, done, total)` hears each stage start, advance (throttled) and end with done == total."""
    source = resolve_source(config.data.path)
    texts = _read(config, source, progress)
    if len(texts) == 0:
        raise UserError(f"data.path: {source.describe} has no rows")
    try:
        return _tokenize_rows(config, source, texts, tokenizer, progress)
    except UnicodeDecodeError as exc:
        # pyarrow's JSON reader stores undecodable bytes as they are; they only fail when read back here
        problem = _encoding_problem(source, config.data.encoding)
        raise UserError(problem or f"data.path: {source.describe} is not valid {config.data.encoding}: {exc}") from None


def _tokenize_rows(
    config: Config,
    source: DataSource,
    texts: Dataset,
    tokenizer: PreTrainedTokenizerBase | None,
    progress: ProgressFn | None,
) -> PreparedData:
    train_rows, val_rows = split_rows(texts, config.data.val_fraction)
    joined = source.builder == "text"
    notes = [source.skipped_note] if source.skipped else []
    if tokenizer is None:
        asked = config.model.vocab_size
        tokenizer = cached_tokenizer(train_rows, asked, joined=joined, progress=progress)
        if len(tokenizer) < asked:
            notes.append(
                f"the tokenizer learned {len(tokenizer):,} tokens; the model's vocabulary is "
                f"{padded_vocab(len(tokenizer)):,} (asked {asked:,})"
            )
    add_eos = not joined  # documents get an end-of-text; a .txt file is one document
    block = config.model.block_size
    n_rows = len(train_rows) + (len(val_rows) if val_rows is not None else 0)
    stage = StageProgress(progress, "tokenizing", n_rows)

    def blocks(rows: Dataset, done_before: int) -> torch.Tensor:
        tokens = tokenize_to_array(
            rows,
            tokenizer,
            add_eos=add_eos,
            num_proc=config.data.num_proc,
            joined=joined,
            stage=stage,
            done_before=done_before,
        )
        return pack(tokens, block)

    train = blocks(train_rows, 0)
    if len(train) == 0:
        raise UserError(f"data.path: {source.describe} is smaller than one block of model.block_size={block} tokens")
    if len(train) < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is more than the {len(train)} blocks of "
            f"{block} tokens in {source.describe}; lower it or add data"
        )
    val = None
    if val_rows is not None:
        val = blocks(val_rows, len(train_rows))
        if len(val) == 0:
            notes.append("the validation split is smaller than one block: eval is off")
            val = None
    stage.end()
    return PreparedData(tokenizer=tokenizer, train=train, val=val, source=source, notes=notes)

"""Data: load text with `datasets`, get a tokenizer (train a byte-level BPE, reuse a cached one, or load
one), tokenize with a cached `map`, pack into block_size blocks, and sample them in an order that is a pure
function of (seed, epoch) so that resume seeks straight to its cursor.

Each preparation stage reports progress through an optional callback (stage, done, total).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.core.sources import DataSource, resolve_source

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token
VOCAB_MULTIPLE = 64  # embedding rows are padded to this, as nanoGPT pads 50257 to 50304 (faster matmuls)
LINES_PER_CHUNK = 64  # plain-text lines joined per tokenizer call: per-line calls cost ~5x in overhead
MAP_BATCH_ROWS = 4096
# Changing how a tokenizer is trained or text is tokenized must change this, so old cache entries miss.
TOKENIZER_RECIPE = "byte-level BPE v2: GPT-2 pre-tokenizer, <|endoftext|> special, 64-line chunks"

ProgressFn = Callable[[str, int, "int | None"], None]


class StageProgress:
    """One data-preparation stage: reports (0, total) at once, then at most every `interval` seconds,
    then (total, total) from end(). Callers never need to throttle."""

    def __init__(self, report: ProgressFn | None, stage: str, total: int | None, interval: float = 0.1) -> None:
        self.report, self.stage, self.total, self.interval = report, stage, total, interval
        self._last = time.monotonic()
        self._emit(0)

    def _emit(self, done: int) -> None:
        if self.report is not None:
            self.report(self.stage, done, self.total)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            # a stage is complete only when end() says so (e.g. BPE merges run after the last row is fed)
            self._emit(done if self.total is None else min(done, self.total - 1))

    def end(self, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self._emit(self.total or 0)


def padded_vocab(n_tokens: int) -> int:
    """The model's vocabulary for a tokenizer of n_tokens: rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


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
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(
            f"{what}: cannot load {path!r} (only local dirs and cached models load offline): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


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
    notes = []
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


def rank_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s share of one global micro-batch: contiguous equal slices in rank order, so the ranks'
    slices concatenated are the global batch and a step sees the same blocks whatever the world size."""
    per_rank = len(global_batch) // world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


class BlockSampler:
    """Batches of block indices. Epoch e's order is randperm(seed, e), so the cursor (epoch, position)
    is the whole sampler state and seeking is one permutation away, never a skip through batches.

    Under data parallelism every rank walks the same global order: each micro-step draws
    batch_size * world_size indices and a rank keeps its `rank_slice`. The cursor counts global indices,
    so it is the same on every rank and one checkpoint's cursor serves any world size."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int, *, world_size: int = 1, rank: int = 0) -> None:
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_blocks, generator=generator)

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._order = epoch, position, None

    def state_dict(self) -> dict[str, int]:
        """The data cursor, as trainer_state.json holds it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seek(int(state["epoch"]), int(state["position"]))

    def next_indices(self) -> torch.Tensor:
        size = self.batch_size * self.world_size
        if self.position + size > self.n_blocks:  # drop the ragged end of an epoch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        start = self.position
        self.position += size
        return rank_slice(self._order[start : self.position], self.rank, self.world_size)

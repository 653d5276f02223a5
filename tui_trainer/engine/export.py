"""Export one checkpoint as a clean Hugging Face model dir (`tui-trainer export RUN[@STEP] DIR`).

The result holds what a user of the model needs and nothing that only resuming needs: safetensors weights in
the dtype asked, config.json, generation_config.json, the tokenizer files and a README.md model card naming
the lineage, the losses and the full training config. No optimizer, scheduler, RNG, scaler, trainer_state or
manifest. The checkpoint is verified (every file re-hashed) before anything is written, the model dir is
built in a hidden temp dir beside DIR and renamed into place, so DIR is either the old one or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.errors import CheckpointDeleted, CheckpointInvalid, UserError
from tui_trainer.core.store import (
    CHECKPOINT_PREFIX,
    MANIFEST,
    OWN_STATE,
    TEMP_PREFIX,
    TRAINER_STATE,
    CheckpointInfo,
    RunStore,
    fsync_path,
    parse_ref,
    read_lease,
    verify_checkpoint,
)
from tui_trainer.core.store.files import remove_stale_temps
from tui_trainer.engine import lora, safetensors_stream, sharded_checkpoint
from tui_trainer.engine.checkpoint_files import WEIGHTS
from tui_trainer.engine.checkpoint_load import check_config_fits_weights
from tui_trainer.engine.model_card import model_card

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a tokenizer may be saved as; everything else in a checkpoint (optimizer.pt, rng.pt, scheduler.pt,
# scaler.pt, rng_state.pth, trainer_state.json, tui_trainer_state.json, manifest.json) is training state
# and stays behind.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# What else an export writes (model*.safetensors aside): a dir holding only these and the tokenizer files is
# a previous export, the only kind of dir --force replaces.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "README.md",
    lora.ADAPTER_CONFIG,
    lora.ADAPTER_WEIGHTS,
)


@dataclass
class Exported:
    ref: str
    path: Path
    dtype: str
    bytes: int


def export_checkpoint(
    store: RunStore, ref: str, dest: str | Path, dtype: str = "fp32", *, force: bool = False, adapter: bool = False
) -> Exported:
    """Verify RUN[@STEP], then write DIR atomically; UserError (one line) for anything the user must fix.
    A LoRA checkpoint exports merged into its base (a plain model dir, no peft needed), or with `adapter`
    as the adapter alone in PEFT's format."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    name, step = parse_ref(ref)
    ckpt = store.checkpoint(name, step, purpose="export")
    if adapter and not lora.is_adapter_checkpoint(ckpt.path):
        raise UserError(f"--adapter: {ckpt.ref} holds a whole model, not a LoRA adapter; export it without --adapter")
    target = Path(dest).absolute()
    _check_target(target, ckpt, store, force)
    try:
        with read_lease(ckpt.path):  # retention on a live run waits until the export has read it
            return _export(store, ckpt, target, dtype, adapter)
    except CheckpointDeleted:
        raise CheckpointDeleted(f"cannot export {ckpt.ref}: {store.deleted_message(ckpt.run, ckpt.step)}") from None


def _export(store: RunStore, ckpt: CheckpointInfo, target: Path, dtype: str, adapter: bool) -> Exported:
    try:
        verify_checkpoint(ckpt.path, deep=True)  # before anything is written: a corrupt file is never copied
    except CheckpointDeleted:
        raise
    except CheckpointInvalid as exc:
        raise CheckpointInvalid(f"cannot export {ckpt.ref}: {exc}") from None
    tmp = target.with_name(f"{TEMP_PREFIX}export-{target.name}.{os.getpid()}")
    # what an export killed with -9 left beside this target (its pid is gone): never cleaned otherwise
    for kind in ("export", "replaced"):
        remove_stale_temps(target.parent, f"{TEMP_PREFIX}{kind}-{target.name}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if adapter:
            _write_adapter(ckpt.path, tmp, DTYPES[dtype])
        else:
            _write_model(ckpt.path, tmp, DTYPES[dtype])
        _copy_tokenizer(ckpt.path, tmp)
        (tmp / "README.md").write_text(model_card(store, ckpt, dtype, adapter=adapter), encoding="utf-8")
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    except OSError as exc:  # a parent that is a file, no permission, disk full: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {target}: {exc.strerror or exc} ({exc.filename or target})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return Exported(ckpt.ref, target, dtype, size)


def _check_target(target: Path, ckpt: CheckpointInfo, store: RunStore, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a directory")
    inside = _runs_dir_part(target, store)
    if inside is not None:  # with or without --force: an export never lands among runs or checkpoints
        real = target.resolve()
        if real == inside:
            where = "is the runs dir" if inside == store.root.resolve() else f"is {inside}, a run or checkpoint"
        else:
            where = f"holds {inside}" if inside.is_relative_to(real) else f"is inside {inside}"
        raise UserError(f"{target}: {where}; export somewhere outside the runs dir")
    try:
        entries = list(target.iterdir()) if target.is_dir() else []
    except OSError as exc:
        raise UserError(f"{target}: cannot read it ({exc.strerror or exc})") from None
    if entries and not force:
        raise UserError(f"{target}: directory is not empty; pass --force to replace a previous export")
    # --force replaces DIR wholesale: only when everything in it is what an export writes, so a user's file
    # (notes, a project, a home) is never deleted by it
    foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in entries if not _is_export_file(e))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{target}: holds {shown}, not a model export; --force only replaces a previous export")


def _is_export_file(entry: Path) -> bool:
    """A plain file an export writes (weights, possibly sharded, configs, tokenizer, model card)."""
    name = entry.name
    known = name in EXPORT_FILES or name in TOKENIZER_FILES or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name)
    return bool(known) and entry.is_file() and not entry.is_symlink()


def _runs_dir_part(target: Path, store: RunStore) -> Path | None:
    """The runs dir, run or checkpoint that target is (or is inside, or holds), through symlinks; else None.

    Checked two ways: against this store (its root and every run in it, resolved, so a run linked in from
    elsewhere — an HF output dir — counts), and by what the dirs on target's path hold, so a checkpoint of
    another runs dir than --runs-dir is refused too."""
    real = target.resolve()
    guarded = [store.root.resolve()]
    with contextlib.suppress(OSError):
        guarded += [store.run_dir(name).resolve() for name in store.run_names()]
    for root in guarded:
        if real.is_relative_to(root) or root.is_relative_to(real):
            return root
    for parent in (real, *real.parents):
        if _is_run_or_checkpoint(parent):
            return parent
    return None


def _is_run_or_checkpoint(path: Path) -> bool:
    if (path / "run.json").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()):
        return True  # a run dir of ours
    if (path / MANIFEST).is_file() or (path / OWN_STATE).is_file():
        return True  # a checkpoint of ours, valid or not
    if re.fullmatch(r"checkpoint-\d+", path.name) and (path / TRAINER_STATE).is_file():
        return True  # an HF Trainer checkpoint
    return path.name.startswith(CHECKPOINT_PREFIX) and path.parent.name == "checkpoints"


def _write_model(source: Path, out: Path, dtype: torch.dtype) -> None:
    """Weights through transformers so config.json records the dtype and tied weights are saved its way."""
    import transformers

    from tui_trainer.engine.models import load_saved

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    adapter = lora.is_adapter_checkpoint(source)
    sharded = sharded_checkpoint.is_sharded_checkpoint(source)
    if sharded:  # FSDP's shards, gathered into one model tensor by tensor
        sharded_checkpoint.check_config_fits_weights(source)
    elif not adapter:  # else a config edited to more layers exports them randomly initialised
        check_config_fits_weights(source)
    if sharded:
        with contextlib.suppress(safetensors_stream.Unstreamable):  # else the whole model, as below
            _stream_sharded_model(source, out, dtype)
            return
    try:
        if sharded:
            model = sharded_checkpoint.load_model(source, dtype)
        else:
            model = lora.load_merged(source, dtype) if adapter else load_saved(source, dtype)
    except UserError:  # the base is gone or changed: the one line says which file
        raise
    except Exception as exc:  # verified bytes that still do not load: name the dir, no traceback
        raise CheckpointInvalid(f"{source}: cannot load the model ({str(exc).splitlines()[0]})") from None
    generation = model.generation_config
    if generation.pad_token_id is None and generation.eos_token_id is not None:
        generation.pad_token_id = generation.eos_token_id  # the pipeline warns on every call otherwise
    model.save_pretrained(out, safe_serialization=True)


def _stream_sharded_model(source: Path, out: Path, dtype: torch.dtype) -> None:
    """A sharded checkpoint's weights gathered into model.safetensors one tensor at a time (never the whole
    model in memory, engine/safetensors_stream.py), with the config.json and generation_config.json that
    save_pretrained would write beside them (the dtype and class recorded as it records them)."""
    from tui_trainer.engine.models import meta_model

    model: Any = meta_model(source)  # a transformers model (typed as a torch Module)
    names = safetensors_stream.saved_names(model)  # Unstreamable before anything is written
    safetensors_stream.write_safetensors(source, out / WEIGHTS, names, dtype)
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        generation = model.generation_config
        if generation.pad_token_id is None and generation.eos_token_id is not None:
            generation.pad_token_id = generation.eos_token_id  # the pipeline warns on every call otherwise
        generation.save_pretrained(out)


def _write_adapter(source: Path, out: Path, dtype: torch.dtype) -> None:
    """The adapter alone, as PEFT saves one: its config and its weights in the dtype asked."""
    from safetensors.torch import load_file, save_file

    shutil.copyfile(source / lora.ADAPTER_CONFIG, out / lora.ADAPTER_CONFIG)
    weights = {k: v.to(dtype) for k, v in load_file(str(source / lora.ADAPTER_WEIGHTS)).items()}
    save_file(weights, str(out / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _copy_tokenizer(source: Path, out: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise CheckpointInvalid(f"{source}: has no tokenizer files to export")
    for name in copied:
        shutil.copyfile(source / name, out / name)


def _fsync_tree(directory: Path) -> None:
    # save_pretrained may leave weights owner-only (0600); give every file the mode our own README.md got
    # from the umask, since a model dir is made to be shared
    mode = (directory / "README.md").stat().st_mode & 0o777
    for entry in directory.iterdir():
        if entry.is_file():
            os.chmod(entry, mode)
            fsync_path(entry)
    fsync_path(directory)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target (empty, or --force) is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f"{TEMP_PREFIX}replaced-{target.name}.{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)  # put the previous export back
        raise
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the model card

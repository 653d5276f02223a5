"""A sharded (DCP) checkpoint's weights as one Hugging Face `model.safetensors`, streamed tensor by tensor.

Used by `export` and by sharded checkpoints with `checkpoint.hf_weights = true`. Loading the whole model to
save_pretrained it holds every weight in host memory at once (DCP's read buffers and a cast on top); a model
sharded because it does not fit one device, or rank 0 of a run saving its checkpoint, must not need that. So
the file is written the way the format allows it (safetensors' spec: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and `data_offsets` into the data
that follows, then the raw little-endian bytes): the header is computed from DCP's index before any tensor is
read, then each tensor is read from the shards alone (one `dcp.load` of a one-key state dict), cast, appended
and dropped. At most one tensor (in its saved and its export dtype) is held at a time.

The names and the tied weights are transformers' own: the model's state_dict names, built on the meta device
from config.json, less the tied copies `save_pretrained` drops (`remove_tied_weights_from_state_dict`: an
output head tied to the embedding is stored once, under the embedding's name), renamed as save_pretrained
renames a family's weights (`revert_weight_conversion`). A family whose weights transformers merges or
splits when it saves them cannot be streamed: `Unstreamable` says so and the caller loads the whole model.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.errors import CheckpointInvalid, ConfigError
from tui_trainer.engine.checkpoint_files import WEIGHTS, FileDigest, written
from tui_trainer.engine.shard_index import read_index, safe_reader

# torch dtype -> the safetensors spec's name for it
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class Unstreamable(Exception):
    """transformers saves this model's weights under other names or shapes than its state dict."""


@dataclass(frozen=True)
class _Entry:
    name: str  # the name in model.safetensors
    key: str  # its name in the model's state dict, and under "model." in the shards
    shape: tuple[int, ...]
    saved: torch.dtype  # the dtype in the shards
    out: torch.dtype  # the dtype written

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.out.itemsize


def saved_names(model: Any) -> dict[str, str]:
    """{name in the file: name in the state dict} as save_pretrained writes `model` (a meta-device model):
    its state dict less the tied copies (transformers' choice of which name of a tied pair stays), renamed
    as transformers renames a family's weights for saving (gpt_neox's lm_head is embed_out on disk)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    # what revert_weight_conversion applies to a model built from a config (not from_pretrained)
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if not all(isinstance(c, WeightRenaming) for c in conversions):  # one tensor made of several: not streamable
        raise Unstreamable(f"{type(model).__name__}: transformers converts its weights when saving them")
    model.tie_weights()
    state = dict(model.state_dict())
    for ignored in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(ignored, None)
    kept = remove_tied_weights_from_state_dict(state, model)
    name_of = {id(tensor): name for name, tensor in kept.items()}  # renaming keeps each (meta) tensor object
    return {saved: name_of[id(tensor)] for saved, tensor in revert_weight_conversion(model, kept).items()}


def check_streamable(hf_config: Any) -> None:
    """ConfigError naming checkpoint.hf_weights when the model `hf_config` describes cannot be streamed
    (its family's weights are merged or split when transformers saves them, as Mixtral's experts are)."""
    import copy

    from tui_trainer.engine.models import family_for

    with torch.device("meta"):
        model = family_for(hf_config.model_type).build(copy.deepcopy(hf_config))
    try:
        saved_names(model)
    except Unstreamable as exc:
        raise ConfigError(
            f"checkpoint.hf_weights: {exc}, so it cannot be written from the shards one tensor at a time; "
            "leave it off and `tui-trainer export` a checkpoint instead"
        ) from None


def _plan(shards: Path, index: Any, names: dict[str, str], dtype: torch.dtype | None) -> list[_Entry]:
    """Each tensor's entry, from DCP's index alone (no shard read); CheckpointInvalid if one is missing."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = index.state_dict_metadata
    entries = []
    for name, key in names.items():
        meta = metadata.get(f"model.{key}")
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointInvalid(f"{shards}: the shards hold no weight {key!r} (config.json names it)")
        saved = meta.properties.dtype
        out = dtype if dtype is not None and saved.is_floating_point else saved  # as model.to(dtype) casts
        if out not in _DTYPE_NAMES:
            raise CheckpointInvalid(f"{shards}: weight {name!r} is {saved}, which safetensors cannot hold")
        entries.append(_Entry(name, key, tuple(meta.size), saved, out))
    # biggest elements first, then by name (as safetensors orders them): every tensor stays aligned to its size
    return sorted(entries, key=lambda e: (-e.out.itemsize, e.name))


def _header(entries: list[_Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers' from_pretrained wants "pt"
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _DTYPE_NAMES[e.out],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # the data starts 8-aligned (the spec allows trailing spaces)
    return struct.pack("<Q", len(text)) + text


def _read_one(shards: Path, reader: Any, entry: _Entry) -> torch.Tensor:
    """One weight, whole, from every shard that holds a piece of it (DCP reassembles it in place)."""
    import torch.distributed.checkpoint as dcp

    tensor = torch.empty(entry.shape, dtype=entry.saved)
    try:
        with warnings.catch_warnings():  # one process, no process group: DCP warns that it assumes so
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load({"model": {entry.key: tensor}}, storage_reader=reader, no_dist=True)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointInvalid(f"{shards}: cannot read weight {entry.key!r} from the shards ({why})") from None
    return tensor


def write_safetensors(shards: Path, out: Path, names: dict[str, str], dtype: torch.dtype | None = None) -> int:
    """Write `out` (model.safetensors) from the DCP shards in `shards`: the tensors `names` ({name in the
    file: key in the shards}, `saved_names`), floating ones
    cast to `dtype` (None: as saved). Returns the file's size. Holds one tensor at a time."""
    index = read_index(shards)  # read once: each tensor's load is given it (unpickled per load, it was O(n^2))
    entries = _plan(shards, index, names, dtype)
    header = _header(entries)
    reader = safe_reader(shards, index)
    with open(out, "wb") as fh:
        fh.write(header)
        for entry in entries:
            tensor = _read_one(shards, reader, entry).to(entry.out).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes (little-endian hosts)
            if data.nbytes != entry.nbytes:
                raise CheckpointInvalid(f"{shards}: weight {entry.name!r} read back at the wrong size")
            fh.write(data.data)
            del tensor, data
    return len(header) + sum(e.nbytes for e in entries)


def write_model_weights(model_dir: Path, out: Path, dtype: torch.dtype | None = None) -> int:
    """`out` from the shards of the checkpoint `model_dir`, named as save_pretrained names them (the model
    config.json there describes, built on the meta device)."""
    from tui_trainer.engine.models import meta_model

    return write_safetensors(model_dir, out, saved_names(meta_model(model_dir)), dtype)


@dataclass
class HFWeights:
    """A checkpoint part (engine/checkpoint_files.py): model.safetensors streamed from the shards that
    ShardFiles moved into the checkpoint's temp dir, named by the config.json PretrainedFiles wrote there, so
    it comes after both in the part list. It names its own file (so the writer runs it after the named parts);
    its checksum goes into the manifest, which is written after it."""

    state: None = None
    file: str = ""
    staged: bool = False

    def write(self, directory: Path) -> dict[str, FileDigest]:
        path = directory / WEIGHTS

        def produce() -> None:
            write_model_weights(directory, path)

        return {WEIGHTS: written(path, produce)}

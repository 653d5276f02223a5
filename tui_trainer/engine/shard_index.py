"""Reading a sharded checkpoint's index without trusting it (ARCHITECTURE.md: threat model).

DCP's `.metadata` (which shard file holds which piece of which tensor) is a pickle, and a checkpoint is
input: it is read by an unpickler that builds only the plain records DCP's index is made of, never an
arbitrary callable, and DCP's reader is given that index instead of unpickling the file itself.
"""

from __future__ import annotations

import enum
import pickle
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.errors import CheckpointInvalid

METADATA = ".metadata"  # DCP's index: which shard file holds which piece of which tensor

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


def _enum_member(cls: Any, name: Any) -> Any:
    """`getattr` as Python 3.11.0-3.11.4 pickles an Enum member (getattr(cls, name)): only a member of an
    allowed Enum class is given back, never any other attribute."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(
        f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not part of a checkpoint index"
    )


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def read_index(path: Path) -> Any:
    """The checkpoint's DCP index (torch's Metadata), or CheckpointInvalid naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path / METADATA, "rb") as fh:
            index = _IndexUnpickler(fh).load()
    except Exception as exc:
        raise CheckpointInvalid(f"{path / METADATA}: refused to load ({str(exc).splitlines()[0]})") from None
    if not isinstance(index, Metadata):
        raise CheckpointInvalid(f"{path / METADATA}: not a checkpoint index")
    return index


def safe_reader(path: Path, index: Any = None) -> Any:
    """DCP's reader for `path`; `index` (read_index's) is given back at every load instead of read again
    (a reader used for many small loads: the streamed export reads one tensor per load)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    known = index

    class SafeReader(FileSystemReader):
        """DCP's reader with the index read by the allowlist above (shards are read with weights_only)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = known if known is not None else read_index(path)
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(path)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each weight's full shape from the index, without reading a shard."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = read_index(path)
    return {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in index.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }

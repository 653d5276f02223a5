"""The on-disk store as data: runs, lineage, checkpoint manifests and metrics (ARCHITECTURE.md §5).

torch-free, so the UI can browse and plot without importing torch. The layout is a contract:

    runs/<run>/run.json                 name, run_id, created, config, parent {run, step} | null, status, pinned
    runs/<run>/metrics.jsonl            one JSON object per line, append-only
    runs/<run>/checkpoints/step-NNNNNNNN/   a HF model dir + optimizer/scheduler/rng .pt + manifest.json

A package of small modules, one job each; import from here: `from tui_trainer.core.store import RunStore`.
"""

from tui_trainer.core.store.files import TEMP_PREFIX, fsync_path, json_safe, write_json_atomic
from tui_trainer.core.store.info import CheckpointInfo, RunInfo, measured_eval
from tui_trainer.core.store.lock import RunLock
from tui_trainer.core.store.manifest import (
    CHECKPOINT_PREFIX,
    FORMAT_VERSION,
    HASH_KEY,
    MANIFEST,
    OWN_STATE,
    READABLE_FORMATS,
    TRAINER_STATE,
    checkpoint_dirname,
    claim_for_deletion,
    hash_file,
    own_state_path,
    read_lease,
    read_manifest,
    same_manifest,
    sha256_file,
    verify_checkpoint,
    write_manifest,
)
from tui_trainer.core.store.metrics import MetricsWriter, read_metrics
from tui_trainer.core.store.names import parse_ref, read_run_id, validate_run_name
from tui_trainer.core.store.runs import RunStore
from tui_trainer.core.store.schema import RUN_NAME_RE
from tui_trainer.core.store.tree import FamilyNode, family_tree, iter_tree

__all__ = [
    "CHECKPOINT_PREFIX",
    "FORMAT_VERSION",
    "HASH_KEY",
    "MANIFEST",
    "OWN_STATE",
    "READABLE_FORMATS",
    "RUN_NAME_RE",
    "TEMP_PREFIX",
    "TRAINER_STATE",
    "CheckpointInfo",
    "FamilyNode",
    "MetricsWriter",
    "RunInfo",
    "RunLock",
    "RunStore",
    "checkpoint_dirname",
    "claim_for_deletion",
    "family_tree",
    "fsync_path",
    "hash_file",
    "iter_tree",
    "json_safe",
    "measured_eval",
    "own_state_path",
    "parse_ref",
    "read_lease",
    "read_manifest",
    "read_metrics",
    "read_run_id",
    "same_manifest",
    "sha256_file",
    "validate_run_name",
    "verify_checkpoint",
    "write_json_atomic",
    "write_manifest",
]

"""The browsing commands: ls, verify, generate, export, config."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from tui_trainer.core import fmt
from tui_trainer.core.config import Config
from tui_trainer.core.config_text import to_toml
from tui_trainer.core.errors import CheckpointDeleted, CheckpointInvalid
from tui_trainer.core.store import RunStore, iter_tree, parse_ref, read_lease, verify_checkpoint

if TYPE_CHECKING:
    pass


def _ls(store: RunStore, *, as_json: bool) -> int:
    tree = list(iter_tree(store))
    if as_json:
        out = []
        for depth, run in tree:
            out.append(
                {
                    "name": run.name,
                    "depth": depth,
                    "status": run.status,
                    "world_size": run.world_size,
                    "restarts": run.restarts,
                    "parent": {"run": run.parent[0], "step": run.parent[1]} if run.parent else None,
                    "damaged": run.damaged or None,
                    "cycle": list(run.cycle) or None,
                    "checkpoints": [
                        {
                            "step": c.step,
                            "loss": c.loss,
                            "eval_loss": c.eval_loss,
                            "bytes": c.size_bytes,
                            "valid": c.valid,
                            "problem": c.problem,
                            "manifest": c.manifest,
                            "sharded": c.sharded,
                            "pinned": c.pinned,
                            "path": str(c.path),
                        }
                        for c in run.checkpoints
                    ],
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    if not tree:
        print(f"no runs yet in {fmt.folder(store.root)}")
        return 0
    for depth, run in tree:
        pad = "  " * depth
        if run.damaged:  # one line: what is wrong, never a traceback that hides the other runs
            print(f"{pad}{run.name}  [damaged]  {run.damaged}")
            continue
        origin = f"  (from {run.parent[0]}@{run.parent[1]})" if run.parent else ""
        if run.cycle:
            origin += f"  (parent loop: {' -> '.join(run.cycle)})"
        ranks = f"  {fmt.plural(run.world_size, 'rank')}" if run.world_size > 1 else ""
        ranks += f"  {fmt.plural(run.restarts, 'restart')}" if run.restarts else ""
        print(f"{pad}{run.name}  [{run.status}]  {fmt.plural(len(run.checkpoints), 'checkpoint')}{ranks}{origin}")
        for c in run.checkpoints:
            # the app's vocabulary: 3-decimal losses, compact sizes, ★ newest ◆ best ⚑ pinned ✗ invalid
            tail = fmt.marks(run, c) + (f" invalid: {c.problem}" if not c.valid else "")
            tail += "" if c.manifest else " no manifest (HF Trainer)"
            tail += f" sharded ({fmt.plural(c.sharded, 'rank')})" if c.sharded else ""
            print(
                f"{pad}  step {c.step:>7}  loss {fmt.loss(c.loss):>6}  eval {fmt.loss(c.eval_loss):>6}  "
                f"{fmt.size(c.size_bytes):>6}  {tail}".rstrip()
            )
    return 0


def _verify(store: RunStore, ref: str | None) -> int:
    if ref is None:
        targets = [c for r in store.runs() for c in r.checkpoints]
    else:
        name, step = parse_ref(ref)
        run = store.run(name)
        targets = [c for c in run.checkpoints if step is None or c.step == step]
        if step is not None and not targets:
            store.checkpoint(name, step)  # raises the "no checkpoint at step" message
    bad = gone = 0
    for c in targets:
        if not c.manifest:  # a Hugging Face Trainer checkpoint: valid, with nothing to check it against
            print(f"ok       {c.ref}: {c.problem}")
            continue
        try:
            verify_checkpoint(c.path)
            print(f"ok       {c.ref}")
        except CheckpointDeleted:  # retention on a live run removed it since the listing: not corrupt
            gone += 1
            print(f"gone     {c.ref}: {store.deleted_message(c.run, c.step)}")
        except CheckpointInvalid as exc:
            bad += 1
            print(f"INVALID  {c.ref}: {exc}")
    print(f"{len(targets) - bad - gone} ok, {bad} invalid" + (f", {gone} deleted by retention" if gone else ""))
    return 1 if bad else 0


def _generate(store: RunStore, args: argparse.Namespace) -> int:
    from tui_trainer.engine.generate import generate_text

    name, step = parse_ref(args.ref)
    ckpt = store.checkpoint(name, step, purpose="generate from")
    try:
        with read_lease(ckpt.path):  # retention on a live run waits until the model is loaded
            text = generate_text(ckpt.path, args.prompt, args.max_new_tokens, args.seed)
    except CheckpointDeleted:
        raise CheckpointDeleted(f"cannot generate: {store.deleted_message(ckpt.run, ckpt.step)}") from None
    print(text)
    return 0


def _export(store: RunStore, args: argparse.Namespace) -> int:
    from tui_trainer.engine.export import export_checkpoint

    done = export_checkpoint(store, args.ref, args.dir, args.dtype, force=args.force, adapter=args.adapter)
    print(f"exported {done.ref} ({done.dtype}, {fmt.size(done.bytes)}) to {done.path}")
    return 0


def _print_config(config: Config) -> int:
    print(to_toml(config, with_docs=True), end="")
    return 0

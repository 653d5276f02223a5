"""The README tells a new user the truth: the install order that avoids the CUDA download, each run file once
with the fields a real run writes, and how long the tests take and how to run a fast subset."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_quick_start_installs_the_cpu_torch_before_anything_that_pulls_in_torch():
    """Issue 19: the CPU-torch step came after the copy-paste commands: pasting the first one fetched the
    multi-gigabyte CUDA build."""
    quick = section("Quick start (fresh clone)")
    commands = [line for block in re.findall(r"```bash\n(.*?)```", quick, re.S) for line in block.splitlines()]
    cpu = next(i for i, line in enumerate(commands) if "download.pytorch.org/whl/cpu" in line)
    installs = [i for i, line in enumerate(commands) if re.search(r"pip install (-e|\.|')", line)]
    assert installs and cpu < min(installs), commands


def layout_entries() -> list[str]:
    """The names in the on-disk layout's tree under runs/<run>/ (files and dirs, each line's first word)."""
    block = re.search(r"## On-disk layout\n\n```\n(.*?)```", README, re.S)
    assert block is not None
    return [m.group(1) for m in re.finditer(r"^ {4}(\S+)\s{2,}", block.group(1), re.M)]


def test_each_run_file_is_listed_once_and_samples_jsonl_with_the_fields_a_run_writes(tmp_path, tiny):
    """Issue 19: samples.jsonl was listed twice, with different fields."""
    entries = layout_entries()
    assert "samples.jsonl" in entries and "metrics.jsonl" in entries
    assert len(entries) == len(set(entries)), sorted(e for e in entries if entries.count(e) > 1)

    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(train__sample_every=2))
    assert Trainer(store, plan_train(store, config, "s"), until_step=2).run() == State.PAUSED
    written = {key for line in store.samples_path("s").read_text().splitlines() for key in json.loads(line)}
    assert written == {"step", "prompt", "text", "time", "seconds"}
    block = re.search(r"## On-disk layout\n\n```\n(.*?)```", README, re.S).group(1)  # type: ignore[union-attr]
    described = re.search(r"^ {4}samples\.jsonl(.*?)(?=^ {4}\S)", block, re.M | re.S).group(1)  # type: ignore[union-attr]
    assert all(re.search(rf"\b{key}\b", described) for key in written), described


def test_the_readme_says_how_long_the_tests_take_and_how_to_run_a_fast_subset():
    quick = section("Quick start (fresh clone)")
    assert re.search(r"whole suite takes about \d+ minutes", quick)
    assert 'python -m pytest -m "not slow and not benchmark"' in quick  # a -m of one's own replaces the default
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)

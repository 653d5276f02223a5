"""A config as text: the TOML `--config` reads (with each key's meaning, as `tui-trainer config` prints it)
and the README's table of keys (a test keeps the README equal to it)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from tui_trainer.core.config import SECTION_TYPES, Config


def to_toml(config: Config | Mapping[str, Any], *, with_docs: bool = False) -> str:
    """Render a config as TOML (the format `--config` reads); `with_docs` puts each key's meaning above it
    as a comment (what `tui-trainer config` prints). A plain dict (a run's recorded config) renders as it
    is, unvalidated: it is a record; non-section entries are skipped."""
    docs = {(section, name): doc for section, rows in field_docs().items() for name, _, doc in rows}
    sections = config.to_dict() if isinstance(config, Config) else config
    lines: list[str] = []
    for section, values in sections.items():
        if not isinstance(values, Mapping):
            continue
        lines.append(f"[{section}]")
        for name, value in values.items():
            if with_docs and (section, name) in docs:
                lines.append(f"# {docs[section, name]}")
            line = f"{name} = {_toml_value(value)}"
            if with_docs and (section, name) == ("optim", "warmup_steps") and _warmup_derived(config):
                line += f"  # not set: derived from train.max_steps={sections['train']['max_steps']}"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _warmup_derived(config: Config | Mapping[str, Any]) -> bool:
    return isinstance(config, Config) and config.warmup_derived


def field_docs() -> dict[str, list[tuple[str, Any, str]]]:
    """(key, default, meaning) for every key of every section, from the fields' metadata (see `key`)."""
    defaults = Config().to_dict()
    return {
        section: [(f.name, defaults[section][f.name], f.metadata["doc"]) for f in dataclasses.fields(cls)]
        for section, cls in SECTION_TYPES.items()
    }


def markdown_table() -> str:
    """The README's configuration table; a test keeps the README equal to it. To refresh the README:
    `python -c "from tui_trainer.core.config_text import markdown_table; print(markdown_table())"`."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, rows in field_docs().items():
        lines.extend(f"| `{section}.{name}` | `{_toml_value(d)}` | {doc} |" for name, d, doc in rows)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    # JSON scalars and lists are TOML too, except NaN/inf, which validation refuses anyway (an old record
    # holding one still renders rather than failing an export)
    return json.dumps(value)

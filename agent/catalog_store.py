"""The catalog entries added over the bus (``catalog add``), and the catalog the agent runs.

They are kept as they were given (the preset form, with the port they were given) in
``<state_dir>/catalog.json``, written whole and atomically, and read at start and at each
reload. The configuration file's ``models:`` stays read-only and wins: a bus entry whose name
the file also has is left out (and logged). Each entry is expanded and validated as the
file's are (presets.py, ``ModelSpec``); one that no longer validates (its preset settings
changed, an alias now taken) is left out with the reason, never the whole catalog.

Blocking file I/O: callers run ``load`` and ``save`` with ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.catalog import Catalog, ModelSpec, check_names
from agent.config import AgentConfig
from agent.presets import PresetError, expand_entries
from shared.commands import describe_validation_error

log = logging.getLogger("modelbus.agent")

CATALOG_FILE = "catalog.json"


class BusCatalog:
    """The entries added over the bus, by name, and their file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CATALOG_FILE
        self.entries: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        """Read the file; a missing one is an empty catalog, an unreadable one is logged
        and changes nothing (the agent runs on with the configuration's models)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.entries = {}
            return
        except (OSError, ValueError) as error:
            log.error("%s is not readable, its entries are left out: %s", self.path, error)
            return
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            log.error("%s holds no 'models' object; its entries are left out", self.path)
            return
        self.entries = {name: entry for name, entry in models.items() if isinstance(entry, dict)}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        body = {"models": self.entries}
        temporary.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)


def expand_one(
    config: AgentConfig, name: str, entry: Mapping[str, Any], taken_ports: Iterable[int]
) -> ModelSpec:
    """One entry as the file's are read: its preset expanded, a port given if it has none;
    ValueError (PresetError, ValidationError) naming what is wrong."""
    expanded = expand_entries({name: dict(entry)}, config.presets, config.weights_dir, taken_ports)
    return ModelSpec.model_validate({**expanded[name], "name": name})


def merged(config: AgentConfig, entries: Mapping[str, Mapping[str, Any]]) -> Catalog:
    """The configuration's models and the bus's, the configuration winning; an entry that
    does not validate beside the others is left out and logged."""
    models: dict[str, ModelSpec] = dict(config.models)
    for name in sorted(entries):
        problem = None
        if name in models:
            problem = "the configuration file has a model of this name, which wins"
        else:
            try:
                spec = expand_one(config, name, entries[name], (m.port for m in models.values()))
                check_names({**models, name: spec})
                models[name] = spec
            except PresetError as error:
                problem = str(error)
            except ValidationError as error:
                problem = describe_validation_error(error)
            except ValueError as error:
                problem = str(error)
        if problem is not None:
            log.warning("catalog entry %s (added over the bus) left out: %s", name, problem)
    return Catalog(models=models)

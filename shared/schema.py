"""JSON Schemas of every payload, for consumers in other languages (n8n, HA)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from shared.commands import COMMAND_MODELS
from shared.messages import (
    Event,
    GpuState,
    HostInfo,
    HostState,
    JobState,
    ModelState,
    Reply,
    WeightsState,
)
from shared.replies import REPLY_DATA

PUBLISHED: dict[str, type[BaseModel]] = {
    "info": HostInfo,
    "gpu": GpuState,
    "state": HostState,
    "model": ModelState,
    "job": JobState,
    "weights": WeightsState,
    "event": Event,
    "reply": Reply,
}


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for published payloads, each command and its reply."""
    schemas = {
        f"{name}.schema.json": model.model_json_schema() for name, model in PUBLISHED.items()
    }
    for command, model in COMMAND_MODELS.items():
        schemas[f"cmd-{command}.schema.json"] = model.model_json_schema()
    for command, data in REPLY_DATA.items():
        schemas[f"reply-{command}.schema.json"] = Reply[data].model_json_schema()  # type: ignore[valid-type]
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"

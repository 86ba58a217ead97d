"""The documented configuration is the real one: every key in docs/configuration.md
loads, and every default it states is the model's default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agent.config import ENV_OVERRIDES, AgentConfig, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented_yaml() -> str:
    match = re.search(r"<!-- config: full -->\n```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/configuration.md lost its full example"
    return match.group(1)


def test_the_full_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(documented_yaml())
    config = load_config(path, environ={})
    assert config.host_id == "gpu1"


def test_the_example_states_the_real_defaults() -> None:
    documented: dict[str, Any] = yaml.safe_load(documented_yaml())
    defaults = AgentConfig().model_dump(mode="json")
    # host_id and state_dir depend on the machine; the rest must match exactly.
    for key in ("broker", "telemetry"):
        assert documented[key] == defaults[key], key
    assert documented["gpu"] == defaults["gpu"]
    assert documented["prefix"] == defaults["prefix"]
    assert documented["log_level"] == defaults["log_level"]


def test_every_environment_variable_is_documented() -> None:
    text = DOC.read_text()
    for variable, key in ENV_OVERRIDES.items():
        assert f"| `{variable}` | `{key}` |" in text

"""The documented configuration is the real one: every key in docs/configuration.md
loads, every default it states is the model's default, and the catalog example
validates and documents every model field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agent.catalog import DockerLaunch, ModelSpec, ProcessLaunch
from agent.config import ENV_OVERRIDES, AgentConfig, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented_yaml(name: str = "full") -> str:
    pattern = rf"<!-- config: {re.escape(name)} -->\n```yaml\n(.*?)```"
    match = re.search(pattern, DOC.read_text(), re.S)
    assert match, f"docs/configuration.md lost its '{name}' example"
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
    for key in (
        "broker",
        "telemetry",
        "gpu",
        "lifecycle",
        "weights",
        "http",
        "gateway",
        "models",
        "prefix",
        "log_level",
    ):
        assert documented[key] == defaults[key], key


def test_the_full_example_shows_every_top_level_key() -> None:
    documented: dict[str, Any] = yaml.safe_load(documented_yaml())
    assert set(documented) == set(AgentConfig.model_fields)


def test_the_models_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(documented_yaml("models"))
    config = load_config(path, environ={})
    models = config.models
    assert set(models) == {"qwen3-vl-30b", "qwen3-32b", "whisperx"}

    llama = models["qwen3-vl-30b"]
    assert llama.runtime == "process" and llama.process is not None
    assert llama.process.argv[0] == "llama-server"
    assert llama.health == "http://127.0.0.1:8101/health"  # the default health_url
    argv = [llama.expand(argument) for argument in llama.process.argv]
    assert argv[argv.index("--port") + 1] == "8101"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--alias") + 1] == "qwen3-vl-30b"

    vllm = models["qwen3-32b"]
    assert vllm.runtime == "docker" and vllm.docker is not None
    assert vllm.docker.image is not None and vllm.docker.container is None
    assert vllm.docker.volumes
    assert vllm.gpus == [0]

    existing = models["whisperx"]
    assert existing.docker is not None and existing.docker.container == "whisperx"
    assert existing.docker.image is None
    assert existing.pinned
    assert config.lifecycle.preload == ["whisperx"]


def test_every_model_field_is_documented() -> None:
    text = DOC.read_text()
    blocks: list[tuple[str, type[BaseModel]]] = [
        ("", ModelSpec),
        ("process.", ProcessLaunch),
        ("docker.", DockerLaunch),
    ]
    for prefix, model in blocks:
        for field in model.model_fields:
            if prefix == "" and field in ("name", "process", "docker"):
                continue  # the key itself, and the launch blocks documented field by field
            assert f"| `{prefix}{field}` |" in text, f"models.<name>.{prefix}{field}"


def test_every_environment_variable_is_documented() -> None:
    text = DOC.read_text()
    for variable, key in ENV_OVERRIDES.items():
        assert f"| `{variable}` | `{key}` |" in text

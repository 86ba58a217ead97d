"""Presets (agent/presets.py): a catalog entry of a few lines becomes the full entry of
llama-server, vLLM, SGLang or any OpenAI server, for either runtime."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.presets import PRESET_PORTS, assign_ports, gguf_file
from bus.settings import ConfigError
from tests.unit.test_configuration_doc import documented_yaml


def load(models: dict[str, Any], tmp_path: Path, **extra: Any) -> Any:
    overrides = {"models": models, "state_dir": str(tmp_path), **extra}
    return load_config(None, environ={}, overrides=overrides)


def test_the_documented_entry_of_each_preset_is_at_most_six_lines(tmp_path: Path) -> None:
    text = documented_yaml("presets")
    config = load_config(_written(tmp_path, text), environ={})
    assert {spec.preset for spec in config.models.values()} == {
        "llama-cpp",
        "vllm",
        "sglang",
        "openai",
    }
    models_part = text.split("models:\n", 1)[1]
    entries = re.split(r"\n(?=  \S)", models_part.strip("\n"))
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.splitlines()) <= 6, entry


def _written(tmp_path: Path, text: str) -> Path:
    data = yaml.safe_load(text)
    data["state_dir"] = str(tmp_path)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_llama_cpp_serves_the_gguf_of_installed_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights" / "qwen"
    (weights / "sub").mkdir(parents=True)
    for name in ("mmproj-F16.gguf", "sub/Q4-00002-of-00002.gguf", "sub/Q4-00001-of-00002.gguf"):
        (weights / name).write_bytes(b"GGUF")
    spec = load({"qwen": {"preset": "llama-cpp", "weights": "qwen", "vram_mb": 900}}, tmp_path)
    spec = spec.models["qwen"]
    assert spec.process is not None
    argv = [spec.expand(a) for a in spec.process.argv]
    assert argv[0] == "llama-server"
    assert argv[argv.index("--model") + 1] == str(weights / "sub/Q4-00001-of-00002.gguf")
    assert argv[argv.index("--port") + 1] == str(spec.port)
    assert argv[argv.index("--alias") + 1] == "qwen"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert spec.health == f"http://127.0.0.1:{spec.port}/health"
    assert spec.stop_signal == "SIGTERM" and spec.sleep is None
    assert spec.upstream_model is None  # llama-server answers to any name


def test_llama_cpp_without_a_gguf_is_refused_with_the_field(tmp_path: Path) -> None:
    (tmp_path / "weights" / "st").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"models\.st: weights 'st' hold no \.gguf file"):
        load({"st": {"preset": "llama-cpp", "weights": "st", "vram_mb": 900}}, tmp_path)


def test_host_settings_and_entry_arguments_come_in_order(tmp_path: Path) -> None:
    presets = {"llama-cpp": {"command": ["/opt/ls"], "args": ["-fa", "on"], "env": {"A": "1"}}}
    models = {
        "m": {
            "preset": "llama-cpp",
            "model_path": "/m/x.gguf",
            "args": ["-c", "${PORT}"],
            "env": {"A": "2", "B": "3"},
            "vram_mb": 1,
        }
    }
    spec = load(models, tmp_path, presets=presets).models["m"]
    assert spec.process is not None
    assert spec.process.argv[0] == "/opt/ls"
    assert spec.process.argv[-4:] == ["-fa", "on", "-c", "${PORT}"]
    assert spec.process.env == {"A": "2", "B": "3"}


def test_vllm_names_itself_and_sleeps_unless_told_not_to(tmp_path: Path) -> None:
    models = {
        "a": {"preset": "vllm", "hf_repo": "Qwen/Qwen3-8B", "vram_mb": 1, "aliases": ["q"]},
        "b": {"preset": "vllm", "hf_repo": "Qwen/Qwen3-8B", "vram_mb": 1, "sleep": None},
    }
    config = load(models, tmp_path)
    sleepy, awake = config.models["a"], config.models["b"]
    assert sleepy.process is not None and awake.process is not None
    assert sleepy.process.argv[:3] == ["vllm", "serve", "Qwen/Qwen3-8B"]
    assert "--enable-sleep-mode" in sleepy.process.argv
    assert sleepy.process.env == {"VLLM_SERVER_DEV_MODE": "1"}
    assert sleepy.sleep == "vllm" and sleepy.stop_signal == "SIGINT"
    assert sleepy.upstream_model == "a"  # an alias still reaches --served-model-name
    assert awake.sleep is None and "--enable-sleep-mode" not in awake.process.argv
    assert awake.process.env == {}


def test_docker_presets_mount_the_weights_and_publish_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "weights" / "w").mkdir(parents=True)
    models = {
        "v": {"preset": "vllm", "runtime": "docker", "weights": "w", "vram_mb": 1},
        "s": {"preset": "sglang", "runtime": "docker", "model_path": "/srv/m", "vram_mb": 1},
        "l": {"preset": "llama-cpp", "runtime": "docker", "hf_repo": "org/m-GGUF", "vram_mb": 1},
    }
    config = load(models, tmp_path)
    vllm, sglang, llama = (config.models[n].docker for n in ("v", "s", "l"))
    assert vllm is not None and sglang is not None and llama is not None
    assert vllm.image == "vllm/vllm-openai:v0.11.0"
    assert vllm.command is not None and vllm.command[:2] == ["--model", "/models/w"]
    assert vllm.volumes == {str(tmp_path / "weights"): "/models:ro"}
    assert vllm.bind == "127.0.0.1" and vllm.gpu_device_request
    assert "0.0.0.0" in vllm.command
    assert sglang.command is not None
    assert sglang.command[:4] == ["python3", "-m", "sglang.launch_server", "--model-path"]
    assert sglang.volumes == {"/srv/m": "/models/m:ro"}
    assert llama.command is not None and llama.command[:2] == ["--hf-repo", "org/m-GGUF"]


def test_openai_needs_its_command(tmp_path: Path) -> None:
    spec = load(
        {"o": {"preset": "openai", "command": ["srv", "--port", "${PORT}"], "vram_mb": 1}},
        tmp_path,
    ).models["o"]
    assert spec.process is not None and spec.process.argv == ["srv", "--port", "${PORT}"]
    assert spec.health == f"http://127.0.0.1:{spec.port}/v1/models"
    with pytest.raises(ConfigError, match=r"models\.o: the openai preset needs 'command'"):
        load({"o": {"preset": "openai", "vram_mb": 1}}, tmp_path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"preset": "ollama"}, "preset must be one of llama-cpp, vllm, sglang, openai"),
        ({"preset": "vllm"}, "needs what to serve"),
        ({"preset": "vllm", "hf_repo": "a/b", "process": {"argv": ["x"]}}, "no process:"),
        ({"preset": "vllm", "hf_repo": "a/b", "image": "i"}, "'image' is for runtime: docker"),
        ({"preset": "llama-cpp", "weights": "w", "file": "../../etc/x"}, "inside the weights'"),
        ({"preset": "llama-cpp", "weights": "w", "file": "/etc/x"}, "inside the weights'"),
    ],
)
def test_entries_a_preset_cannot_complete_are_refused(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load({"m": {**entry, "vram_mb": 1}}, tmp_path)


def test_ports_are_stable_and_never_shared() -> None:
    entries: dict[str, dict[str, Any]] = {f"m{i}": {"preset": "vllm"} for i in range(50)}
    entries["fixed"] = {"port": 20000}
    assign_ports(entries)
    ports = [e["port"] for e in entries.values()]
    assert len(set(ports)) == len(ports)
    assert all(p in PRESET_PORTS for p in ports)
    again: dict[str, dict[str, Any]] = {"m7": {"preset": "vllm"}}
    assign_ports(again)
    assert again["m7"]["port"] == entries["m7"]["port"]
    taken: dict[str, dict[str, Any]] = {"m7": {"preset": "vllm"}}
    assign_ports(taken, taken=[entries["m7"]["port"]])
    assert taken["m7"]["port"] != entries["m7"]["port"]


def test_gguf_file_is_none_for_a_missing_directory(tmp_path: Path) -> None:
    assert gguf_file(tmp_path / "absent") is None

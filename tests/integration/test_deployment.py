"""The deployment files in deploy/: the compose file as Compose itself reads it, the
Dockerfile's instructions, the example agent config through the agent's own loader,
and the systemd unit through ``systemd-analyze verify``.

Nothing is built or started: no image can be pulled on the test machines
(``python:3.11-slim``, ``eclipse-mosquitto:2``) and there is no GPU. ``compose config``
needs no daemon.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "modelbus-agent.service"
EXAMPLE_CONFIG = DEPLOY / "agent.example.yaml"
CONFIG_PATH = "/etc/modelbus/agent.yaml"
PASSWORD = "s3cret-pw"


# ---- docker compose config ---------------------------------------------------------


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when the plugin answers, else ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def run_compose_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            "(bash .ci/install-docker.sh installs Debian's docker-compose)"
        )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODELBUS_", "COMPOSE_"))}
    # A private config dir: no user-wide settings or context reach the command.
    environ.update(DOCKER_CONFIG=str(tmp_path / "docker-config"), **env)
    return subprocess.run(
        [*command, "--project-directory", str(DEPLOY), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as Compose resolves it (YAML from v1 and v2 alike)."""
    result = run_compose_config(
        tmp_path_factory.mktemp("compose"),
        MODELBUS_AGENT_PASSWORD=PASSWORD,
        MODELBUS_HOST_ID="gpu7",
        DOCKER_GID="4242",
    )
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only), from short ("a:b:ro", v1) or long (v2)
    volume syntax."""
    found: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, "ro" in (mode[0].split(",") if mode else []))
        else:
            found[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only")))
    return found


def test_compose_file_validates_and_has_both_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"mosquitto", "agent"}


def test_compose_agent_gets_the_gpus_the_socket_and_its_config(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    nvidia = devices[0]
    assert nvidia["driver"] == "nvidia"
    assert str(nvidia["count"]) in {"all", "-1"}  # v2 may normalise "all" to -1
    assert "gpu" in nvidia["capabilities"]

    by_target = mounts(agent)
    assert by_target["/var/run/docker.sock"][0] == "/var/run/docker.sock"
    config_source, config_ro = by_target[CONFIG_PATH]
    assert config_ro and Path(config_source) == DEPLOY / "agent.yaml"
    # Same path inside and out: docker.volumes of runtime: docker models are host paths.
    assert by_target["/var/lib/modelbus"] == ("/var/lib/modelbus", False)

    assert agent["pid"] == "host"
    assert agent["network_mode"] == "host"
    assert [str(gid) for gid in agent["group_add"]] == ["4242"]
    assert agent["restart"] == "unless-stopped"
    assert "mosquitto" in agent["depends_on"]
    assert agent["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(agent["build"]["context"]) == ROOT


def test_compose_agent_environment_points_at_the_broker(compose: dict[str, Any]) -> None:
    env = compose["services"]["agent"]["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    assert env["MODELBUS_BROKER"] == f"mqtt://gpu7:{PASSWORD}@127.0.0.1:1883"
    assert env["MODELBUS_HOST_ID"] == "gpu7"
    assert env["MODELBUS_STATE_DIR"] == "/var/lib/modelbus"
    assert env["MODELBUS_WEIGHTS_DIR"] == "/var/lib/modelbus/weights"
    # The environment the compose file gives is one the agent accepts.
    config = load_config(EXAMPLE_CONFIG, environ=env)
    assert config.host_id == "gpu7"


def test_compose_mosquitto_uses_the_shipped_config_at_its_own_paths(
    compose: dict[str, Any],
) -> None:
    broker = compose["services"]["mosquitto"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    by_target = mounts(broker)
    conf_source, conf_ro = by_target["/etc/mosquitto/mosquitto.conf"]
    assert conf_ro and Path(conf_source) == ROOT / "mosquitto" / "mosquitto.conf"
    acl_source, acl_ro = by_target["/etc/mosquitto/modelbus/acl"]
    assert acl_ro and Path(acl_source) == ROOT / "mosquitto" / "acl"
    assert by_target["/etc/mosquitto/modelbus/passwd"][1]
    assert "/var/lib/mosquitto" in by_target
    assert "-c /etc/mosquitto/mosquitto.conf" in " ".join(broker["entrypoint"])

    # Every path the shipped conf names is one the compose file provides.
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["password_file"] in by_target
    assert settings["acl_file"] in by_target
    assert settings["persistence_location"].rstrip("/") in by_target
    assert os.path.dirname(settings["pid_file"]) in " ".join(broker["entrypoint"])
    # It listens on loopback: reachable from the agent only on the host network.
    assert settings["listener"].split() == ["1883", "127.0.0.1"]
    assert broker["network_mode"] == "host"


def test_compose_refuses_to_run_without_the_agent_password(tmp_path: Path) -> None:
    result = run_compose_config(tmp_path)
    assert result.returncode != 0
    assert "MODELBUS_AGENT_PASSWORD" in result.stderr


# ---- Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_builds_the_agent_image_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(k == "RUN" and "pip install ." in args for k, args in instructions)
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint == ["modelbus", "agent"]
    assert json.loads(dict(instructions)["CMD"]) == ["--config", CONFIG_PATH]
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert "LABEL" in keywords
    # Everything it copies from the repository exists there (the context is the root),
    # and every package pyproject.toml installs is copied.
    copied = set()
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _destination = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                copied.add(source)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted = {pattern.rstrip("*") for pattern in packages["packages"]["find"]["include"]}
    assert wanted <= copied, wanted - copied


# ---- the example agent config -----------------------------------------------------------


def test_example_config_loads_with_the_agents_loader() -> None:
    config = load_config(EXAMPLE_CONFIG, environ={})
    assert config.host_id == "gpu1"
    assert str(config.state_dir) == "/var/lib/modelbus"
    assert str(config.weights.dir) == "/var/lib/modelbus/weights"
    assert config.gpu.backend == "nvml"
    assert config.models, "the example should show at least one model"


# ---- systemd unit -----------------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit


def test_unit_runs_the_venv_agent_and_reloads_with_sighup() -> None:
    service = read_unit()["Service"]
    assert service["Type"] == "simple"
    assert service["User"] == "modelbus"
    assert shlex.split(service["ExecStart"]) == [
        "/opt/modelbus/.venv/bin/modelbus",
        "agent",
        "--config",
        CONFIG_PATH,
    ]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    # Model servers outlive the agent so the next one adopts them.
    assert service["KillMode"] == "process"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a bad config: restarting won't help
    assert service["EnvironmentFile"] == "-/etc/modelbus/agent.env"
    assert service["StateDirectory"] == "modelbus"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/modelbus" in service["ReadWritePaths"].split()
    # These would hide /dev/nvidia* or other users' processes from NVML.
    assert "PrivateDevices" not in service
    assert "ProtectProc" not in service


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify insists that ExecStart exists: point it at a stand-in executable.
    stand_in = tmp_path / "modelbus"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/modelbus/.venv/bin/modelbus", str(stand_in)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # A misspelt key or value is only a warning ("..., ignoring"): any line about the
    # unit's file counts as a failure.
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stderr

"""The ``modelbus`` command as a user meets it: exit codes and one-sentence errors."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent_process import REPO_ROOT


def modelbus(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelbus", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
    )


def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("telemetry:\n  interval_s: fast\n")
    result = modelbus("agent", "--config", str(config))
    assert result.returncode == 2
    assert "telemetry.interval_s" in result.stderr
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_yaml_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("broker: {url: [\n")
    result = modelbus("agent", "--config", str(config))
    assert result.returncode == 2
    assert "line" in result.stderr and "Traceback" not in result.stderr


def test_bad_flag_value_exits_2(tmp_path: Path) -> None:
    result = modelbus("agent", "--host-id", "Not Valid", "--sim")
    assert result.returncode == 2
    assert "host_id" in result.stderr


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver"
)
def test_without_nvml_the_agent_says_so_and_suggests_the_simulator(tmp_path: Path) -> None:
    # This machine has no NVIDIA driver, so the real NVML library is missing.
    result = modelbus("agent", "--broker", "mqtt://127.0.0.1:9", "--host-id", "x")
    assert result.returncode == 1, result.stderr
    assert "--sim" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = modelbus("frobnicate")
    assert result.returncode == 2

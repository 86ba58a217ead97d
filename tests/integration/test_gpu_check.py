"""bench/gpu_check.py, the real GPU check, as far as it can run here: without a GPU it says
so and exits 2; on a simulated GPU (--simulate) its whole path runs, embedded broker and
all, and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent_process import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode == 0:
        pytest.skip("this machine has an NVIDIA GPU: the check ran for real")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gpu_check: ")
    assert "NVIDIA" in result.stderr or "CUDA" in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_on_a_simulated_gpu_the_whole_check_runs(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--simulate", "--switches", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["cold"]["switches"] == report["warm"]["switches"] == 2
    assert report["cold"]["slept"] == 0 and report["warm"]["woken"] == 2
    assert [row["when"] for row in report["telemetry"]] == ["idle", "big loaded"]
    assert report["nvml_processes"].startswith("listed")

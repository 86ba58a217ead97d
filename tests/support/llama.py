"""The real llama.cpp server for the tests: built once by .ci/build-llama-server.sh from
the source in the llama-cpp-python sdist and cached outside the clone, and tiny
random-weight GGUF models for it, written at test time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import free_port
from tests.support.agent_process import REPO_ROOT
from tests.support.tiny_gguf import write_tiny_llama

BUILD_SCRIPT = REPO_ROOT / ".ci" / "build-llama-server.sh"
# .ci/run sets this: there a missing llama-server fails the tests instead of skipping them.
REQUIRED_VARIABLE = "MODELBUS_REQUIRE_LLAMA_SERVER"


def llama_server_binary() -> Path:
    """The cached binary (its path from the build script, which builds nothing when the
    cache holds it), or a skip outside CI when it was never built."""
    cached = _cached()
    if cached is not None:
        return cached
    message = f"llama-server is not built: run bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}"
    if os.environ.get(REQUIRED_VARIABLE):
        pytest.fail(message)
    pytest.skip(message)


def _cached() -> Path | None:
    version = next(
        line.split("=", 1)[1].split()[0]
        for line in BUILD_SCRIPT.read_text().splitlines()
        if line.startswith("VERSION=")
    )
    cache = Path(os.environ.get("MODELBUS_CACHE", Path.home() / ".cache" / "modelbus"))
    binary = cache / f"llama-server-{version}" / "bin" / "llama-server"
    if not binary.is_file():
        return None
    probe = subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=False)
    return binary if probe.returncode == 0 else None


def llama_model(binary: Path, gguf: Path, *, vram_mb: int, **spec: Any) -> dict[str, Any]:
    """A catalog entry serving ``gguf`` with the real llama-server, holding ``vram_mb``
    of simulated memory while it runs (tests/support/vram_holder.py)."""
    argv = [sys.executable, "-m", "tests.support.vram_holder", str(vram_mb), "--", str(binary)]
    argv += ["-m", str(gguf), "--host", "127.0.0.1", "--port", "${PORT}", "-c", "512"]
    argv += ["--threads", "1", "--parallel", "2", "--no-webui"]
    entry: dict[str, Any] = {
        "runtime": "process",
        "process": {"argv": argv, "cwd": str(REPO_ROOT)},
        "port": free_port(),
        "vram_mb": vram_mb,
        "stop_timeout_s": 10,
        "load_timeout_s": 60,
    }
    entry.update(spec)
    return entry


def tiny_models(directory: Path) -> tuple[Path, Path]:
    """Two GGUF files of different sizes (a switch between them really swaps servers)."""
    directory.mkdir(parents=True, exist_ok=True)
    small = write_tiny_llama(directory / "tiny-2l.gguf", name="tiny-2l", layers=2)
    big = write_tiny_llama(directory / "tiny-4l.gguf", name="tiny-4l", layers=4, embedding=128)
    return small, big

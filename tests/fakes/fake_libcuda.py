"""Builds tests/fakes/fake_libcuda.c, a stand-in for the CUDA driver library, with the C
compiler when there is one. Named ``libcuda.so.1`` in a folder of its own, it is what
``ctypes.CDLL("libcuda.so.1")`` finds with that folder on ``LD_LIBRARY_PATH``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_suffix(".c")


def build_fake_libcuda(directory: Path, *, no_device: bool = False) -> Path:
    """``directory/libcuda.so.1``; skips the test when no C compiler is installed."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the fake libcuda")
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "libcuda.so.1"
    flags = ["-DFAKE_NO_DEVICE"] if no_device else []
    command = [compiler, "-shared", "-fPIC", *flags, "-o", str(library), str(SOURCE)]
    subprocess.run(command, check=True, capture_output=True)
    return library

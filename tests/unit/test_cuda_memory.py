"""devtools/cuda_memory.py without a GPU: its chunk bookkeeping against a fake driver that
keeps the driver's accounts, and what a machine without libcuda says."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.cuda_memory import CHUNK_MB, MIB, CudaDriver, CudaError, CudaMemory
from tests.fakes.fake_libcuda import build_fake_libcuda
from tests.unit.test_simserver import REPO_ROOT, free_port


class FakeDriver:
    """Two devices; every allocation and free recorded, freeing an unknown pointer fails."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, int]] = {}  # pointer -> (device, bytes)
        self._next = 0x1000

    def device_count(self) -> int:
        return 2

    def allocate(self, device: int, size: int) -> int:
        self._next += size
        self.live[self._next] = (device, size)
        return self._next

    def free(self, device: int, pointer: int) -> None:
        held_on, _ = self.live.pop(pointer)
        assert held_on == device

    def mb(self, device: int) -> int:
        return sum(size for d, size in self.live.values() if d == device) // MIB


def test_usage_grows_and_shrinks_to_the_exact_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    driver = FakeDriver()
    memory = CudaMemory([0, 1], driver)
    memory.set_usage(1, 2 * CHUNK_MB + 7)
    assert driver.mb(1) == 2 * CHUNK_MB + 7 and driver.mb(0) == 0
    assert len(driver.live) == 3  # two chunks and the remainder
    memory.set_usage(1, CHUNK_MB + 3)
    assert driver.mb(1) == CHUNK_MB + 3
    memory.set_usage(1, 4 * CHUNK_MB)
    assert driver.mb(1) == 4 * CHUNK_MB
    memory.set_usage(0, 10)
    memory.release()
    assert driver.live == {}
    with pytest.raises(ValueError, match="0 or more"):
        memory.set_usage(0, -1)


def test_inside_a_server_its_gpus_are_the_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runtime sets CUDA_VISIBLE_DEVICES to the model's GPUs: NVML's GPU 3 is then the
    process's CUDA device 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    driver = FakeDriver()
    memory = CudaMemory([3], driver)
    memory.set_usage(3, 5)
    assert driver.mb(0) == 5
    assert memory.gpu_count == 4  # GPU 3 is usable


def test_a_gpu_the_driver_does_not_show_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert CudaMemory([5], FakeDriver()).gpu_count == 0


def test_without_a_driver_the_error_says_so() -> None:
    with pytest.raises(CudaError, match="no CUDA driver here"):
        CudaDriver("libcuda-that-does-not-exist.so.1")


def test_the_server_with_cuda_memory_and_no_driver_exits_1_in_one_line() -> None:
    try:
        CudaDriver()
    except CudaError:
        pass
    else:
        pytest.skip("this machine has a CUDA driver")
    command = [sys.executable, "-m", "devtools.simserver", "--port", str(free_port())]
    result = subprocess.run(
        [*command, "--memory", "cuda", "--vram-mb", "64"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no CUDA driver here" in result.stderr


def test_the_ctypes_calls_against_a_fake_driver_library(tmp_path: Path) -> None:
    """The declarations (the _v2 entry points, pointer and size widths, the primary context,
    error names) through a C stand-in for libcuda (tests/fakes/fake_libcuda.c), which checks
    every pointer and size it is given against its own allocations."""
    library = build_fake_libcuda(tmp_path / "cuda")
    driver = CudaDriver(str(library))
    fake = ctypes.CDLL(str(library))
    assert driver.device_count() == 2
    memory = CudaMemory([0, 1], driver)
    memory.set_usage(1, CHUNK_MB + 5)
    pointers = [pointer for pointer, _ in memory._held[1].chunks]
    assert [fake.fake_last_byte(ctypes.c_uint64(p)) for p in pointers] == [0, 0]  # written
    memory.set_usage(1, 3)
    assert len(memory._held[1].chunks) == 1
    with pytest.raises(
        CudaError,
        match=r"cuMemAlloc of 64 MiB on device 0 \(0 of 256 MiB free\) failed: "
        "CUDA_ERROR_OUT_OF_MEMORY",
    ):
        memory.set_usage(0, 1024)  # the fake's devices hold 256 MiB
    memory.release()
    assert fake.fake_last_byte(ctypes.c_uint64(pointers[0])) == -1  # freed


def test_a_driver_without_a_device_says_so(tmp_path: Path) -> None:
    library = build_fake_libcuda(tmp_path / "cuda", no_device=True)
    with pytest.raises(CudaError, match="cuInit failed: CUDA_ERROR_NO_DEVICE"):
        CudaDriver(str(library))

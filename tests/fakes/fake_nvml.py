"""A stand-in for the pynvml module, for testing agent/gpu/nvml.py without a GPU.

It keeps pynvml's real exception classes and constants, so the backend meets the
very ``NVMLError_NotSupported`` (and friends) a real driver would raise; only the
nvml* functions the backend calls are replaced by ones that read FakeDevice objects.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeProcess:
    pid: int
    used_memory_bytes: int | None  # None: NVML cannot tell (WDDM, MIG without permission)
    compute: bool = True  # listed by nvmlDeviceGetComputeRunningProcesses
    graphics: bool = False  # listed by nvmlDeviceGetGraphicsRunningProcesses


@dataclass
class FakeDevice:
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    name: str = "NVIDIA Fake GPU"
    memory_total_bytes: int = 24 * 1024 * MIB
    memory_used_bytes: int = 0
    memory_reserved_bytes: int = 0  # v1 counts it as used, v2 reports it apart
    gpu_utilization_percent: int = 0
    memory_utilization_percent: int = 0
    temperature_c: int = 40
    power_mw: int = 50_000
    power_limit_mw: int = 300_000
    processes: list[FakeProcess] = field(default_factory=list)
    # nvml* function names that answer NVML_ERROR_NOT_SUPPORTED on this device.
    unsupported: set[str] = field(default_factory=set)
    # Flip at runtime to make the GPU fall off the bus (every call: GPU_IS_LOST).
    lost: bool = False
    # Or let it fall off by itself after this many calls on it.
    lose_after_calls: int | None = None
    calls: int = 0


def nvml_error(code: int) -> pynvml.NVMLError:
    """pynvml's own constructor, which maps the code to its subclass."""
    return pynvml.NVMLError(code)


def make_fake_nvml(
    devices: list[FakeDevice],
    *,
    init_error: int | None = None,
    memory_v2_supported: bool = True,
    strings_as_bytes: bool = False,
    driver_version: str = "550.54.15",
    cuda_version: int | None = 12040,
    process_names: dict[int, str] | None = None,
) -> types.ModuleType:
    """A module that looks like pynvml over ``devices`` (a live list: pop one to
    shrink the device count). ``module.calls`` records every nvml* call and
    ``module.initialised`` whether nvmlInit is in effect."""
    module = types.ModuleType("fake_pynvml")
    for name in dir(pynvml):
        if name.startswith(("NVMLError", "NVML_")) or name in (
            "nvmlMemory_v2",
            "NVMLLibraryMismatchError",
        ):
            setattr(module, name, getattr(pynvml, name))
    calls: list[str] = []
    module.calls = calls  # type: ignore[attr-defined]
    module.initialised = False  # type: ignore[attr-defined]
    names = process_names or {}

    def text(value: str) -> str | bytes:
        return value.encode() if strings_as_bytes else value

    def api(function: Callable[..., Any]) -> Callable[..., Any]:
        """Record the call and refuse it before nvmlInit, as NVML does."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(function.__name__)
            if function.__name__ != "nvmlInit" and not module.initialised:
                raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
            return function(*args, **kwargs)

        wrapper.__name__ = function.__name__
        setattr(module, function.__name__, wrapper)
        return wrapper

    def device(handle: FakeDevice, function: str) -> FakeDevice:
        handle.calls += 1
        if handle.lose_after_calls is not None and handle.calls > handle.lose_after_calls:
            handle.lost = True
        if handle.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if function in handle.unsupported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return handle

    @api
    def nvmlInit() -> None:
        if init_error is not None:
            raise nvml_error(init_error)
        module.initialised = True  # type: ignore[attr-defined]

    @api
    def nvmlShutdown() -> None:
        module.initialised = False  # type: ignore[attr-defined]

    @api
    def nvmlSystemGetDriverVersion() -> str | bytes:
        return text(driver_version)

    @api
    def nvmlSystemGetCudaDriverVersion_v2() -> int:
        if cuda_version is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return cuda_version

    @api
    def nvmlSystemGetProcessName(pid: int) -> str | bytes:
        if pid not in names:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return text(names[pid])

    @api
    def nvmlDeviceGetCount() -> int:
        return len(devices)

    @api
    def nvmlDeviceGetHandleByIndex(index: int) -> FakeDevice:
        if index >= len(devices):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return device(devices[index], "nvmlDeviceGetHandleByIndex")

    @api
    def nvmlDeviceGetUUID(handle: FakeDevice) -> str | bytes:
        return text(device(handle, "nvmlDeviceGetUUID").uuid)

    @api
    def nvmlDeviceGetName(handle: FakeDevice) -> str | bytes:
        return text(device(handle, "nvmlDeviceGetName").name)

    @api
    def nvmlDeviceGetMemoryInfo(handle: FakeDevice, version: int | None = None) -> Any:
        gpu = device(handle, "nvmlDeviceGetMemoryInfo")
        total, used, reserved = (
            gpu.memory_total_bytes,
            gpu.memory_used_bytes,
            gpu.memory_reserved_bytes,
        )
        if version is None:
            return types.SimpleNamespace(
                total=total, used=used + reserved, free=total - used - reserved
            )
        if not memory_v2_supported:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return types.SimpleNamespace(
            version=version, total=total, reserved=reserved, used=used, free=total - used - reserved
        )

    @api
    def nvmlDeviceGetUtilizationRates(handle: FakeDevice) -> Any:
        gpu = device(handle, "nvmlDeviceGetUtilizationRates")
        return types.SimpleNamespace(
            gpu=gpu.gpu_utilization_percent, memory=gpu.memory_utilization_percent
        )

    @api
    def nvmlDeviceGetTemperature(handle: FakeDevice, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return device(handle, "nvmlDeviceGetTemperature").temperature_c

    @api
    def nvmlDeviceGetPowerUsage(handle: FakeDevice) -> int:
        return device(handle, "nvmlDeviceGetPowerUsage").power_mw

    @api
    def nvmlDeviceGetEnforcedPowerManagementLimit(handle: FakeDevice) -> int:
        return device(handle, "nvmlDeviceGetEnforcedPowerManagementLimit").power_limit_mw

    @api
    def nvmlDeviceGetPowerManagementLimit(handle: FakeDevice) -> int:
        return device(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_mw

    def listed(processes: list[FakeProcess]) -> list[Any]:
        return [
            types.SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_memory_bytes) for p in processes
        ]

    @api
    def nvmlDeviceGetComputeRunningProcesses(handle: FakeDevice) -> list[Any]:
        gpu = device(handle, "nvmlDeviceGetComputeRunningProcesses")
        return listed([p for p in gpu.processes if p.compute])

    @api
    def nvmlDeviceGetGraphicsRunningProcesses(handle: FakeDevice) -> list[Any]:
        gpu = device(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return listed([p for p in gpu.processes if p.graphics])

    return module

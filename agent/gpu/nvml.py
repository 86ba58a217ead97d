"""GPU telemetry from NVIDIA's NVML, the only module that talks to pynvml.

Modelled on nvitop's NVML layer: the library is loaded and initialised on first
use, every metric goes through one query wrapper that turns "this card cannot
tell you" into ``None``, and each sample is an immutable snapshot. A GPU that
stops answering is reported with ``lost=True``; only a driver that is gone
altogether raises GpuUnavailableError.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from agent import processes
from agent.gpu.base import DriverInfo, GpuProcessSample, GpuSample, GpuUnavailableError

BYTES_PER_MIB = 1024 * 1024
MILLIWATTS_PER_WATT = 1000
# NVML's "value not available" for unsigned 64-bit fields (per-process memory under
# WDDM or MIG without permission); recent pynvml maps it to None, older ones do not.
NVML_VALUE_NOT_AVAILABLE_ULL = (1 << 64) - 1

_SIM_HINT = "or run the agent with --sim for simulated GPUs."

# Error names rather than numbers, so a fake module with pynvml's constants works too.
# The whole library is unusable: no query on any GPU can succeed.
_BACKEND_GONE_ERRORS = (
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIBRARY_NOT_FOUND",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
)
# One GPU stopped answering (fell off the bus, needs a reset); the others may be fine.
_DEVICE_GONE_ERRORS = (
    "NVML_ERROR_GPU_IS_LOST",
    "NVML_ERROR_NOT_FOUND",
    "NVML_ERROR_UNKNOWN",
    "NVML_ERROR_GPU_NOT_FOUND",
    "NVML_ERROR_RESET_REQUIRED",
)
# Anything else (NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, NO_DATA, ...)
# only costs the one metric.

_UNAVAILABLE_MESSAGES = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": (
        "NVML could not find the NVIDIA driver library (libnvidia-ml.so): "
        f"install the NVIDIA driver, {_SIM_HINT}"
    ),
    "NVML_ERROR_DRIVER_NOT_LOADED": (
        "The NVIDIA kernel driver is not loaded: "
        f"load it (nvidia-smi should list your GPUs), {_SIM_HINT}"
    ),
    "NVML_ERROR_NO_PERMISSION": (
        "NVML was denied access to the GPUs: "
        f"run the agent as a user that may open /dev/nvidia*, {_SIM_HINT}"
    ),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (
        "The NVIDIA driver library does not match the loaded kernel driver: "
        f"reboot after the driver upgrade, {_SIM_HINT}"
    ),
}


class _DeviceLost(Exception):
    """Internal: one GPU stopped answering mid-sample."""


@dataclass(frozen=True, slots=True)
class _Identity:
    uuid: str | None
    name: str | None


class NvmlBackend:
    """GpuBackend over NVML. ``nvml`` lets tests inject a fake pynvml module."""

    name = "nvml"

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml: Any = nvml
        self._initialised = False
        self._handles: dict[int, Any] = {}
        # Kept after a GPU is lost, so the lost sample still says which card it was.
        self._identities: dict[int, _Identity] = {}
        self._memory_v2_unsupported = False
        # The agent may start a new call while a timed-out one still runs in its thread.
        self._lock = threading.Lock()

    # ---- GpuBackend ------------------------------------------------------

    def driver_info(self) -> DriverInfo:
        with self._lock:
            self._ensure_initialised()
            driver_version = _text(self._system_query("nvmlSystemGetDriverVersion"))
            cuda = self._system_query("nvmlSystemGetCudaDriverVersion_v2")
            if cuda is None:
                cuda = self._system_query("nvmlSystemGetCudaDriverVersion")
            return DriverInfo(
                backend=self.name,
                driver_version=driver_version,
                cuda_version=format_cuda_version(cuda),
            )

    def sample(self) -> tuple[GpuSample, ...]:
        with self._lock:
            self._ensure_initialised()
            present = self._device_count()
            samples = []
            for index in self._indices(present):
                try:
                    samples.append(self._sample_device(index, present))
                except _DeviceLost:
                    self._handles.pop(index, None)
                    samples.append(self._lost_sample(index))
            return tuple(samples)

    def memory_signature(self) -> tuple[int, ...]:
        with self._lock:
            self._ensure_initialised()
            present = self._device_count()
            signature: list[int] = []
            for index in self._indices(present):
                try:
                    signature.extend(self._device_signature(index, present))
                except _DeviceLost:
                    self._handles.pop(index, None)
                    signature.extend((-1, -1))
            return tuple(signature)

    def change_signal(self) -> None:
        """NVML has no memory-change events (its event sets cover XID errors and
        clocks), so the agent polls memory_signature() instead."""
        return None

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._shutdown()

    # ---- lifecycle -------------------------------------------------------

    def _ensure_initialised(self) -> None:
        if self._initialised:
            return
        nvml = self._library()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise GpuUnavailableError(self._unavailable_message(error, "start")) from None
        self._initialised = True
        if self._device_count() == 0:
            self._shutdown()
            raise GpuUnavailableError(
                "NVML found no NVIDIA GPUs: check that nvidia-smi lists them, " + _SIM_HINT
            )

    def _shutdown(self) -> None:
        self._forget_session()
        # If the driver is already gone there is nothing left to release.
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def _library(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise GpuUnavailableError(
                    "The nvidia-ml-py package (module pynvml) is not installed: "
                    f"install it, {_SIM_HINT}"
                ) from None
            self._nvml = pynvml
        return self._nvml

    def _device_count(self) -> int:
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError as error:
            self._forget_session()
            raise GpuUnavailableError(self._unavailable_message(error, "count the GPUs")) from None

    def _indices(self, present: int) -> range:
        # A GPU that vanished from the count is still listed, as lost, until restart.
        remembered = max(self._identities, default=-1) + 1
        return range(max(present, remembered))

    def _forget_session(self) -> None:
        """The driver went away: start afresh (nvmlInit again) on the next call."""
        self._initialised = False
        self._handles.clear()

    # ---- one GPU -----------------------------------------------------------

    def _sample_device(self, index: int, present: int) -> GpuSample:
        handle = self._handle(index, present)
        identity = self._identities[index]
        memory = self._memory(handle)
        utilization = self._query("nvmlDeviceGetUtilizationRates", handle)
        power_mw = self._query("nvmlDeviceGetPowerUsage", handle)
        limit_mw = self._query("nvmlDeviceGetEnforcedPowerManagementLimit", handle)
        if limit_mw is None:
            limit_mw = self._query("nvmlDeviceGetPowerManagementLimit", handle)
        return GpuSample(
            index=index,
            uuid=identity.uuid,
            name=identity.name,
            memory_total_mb=_mib(memory, "total"),
            memory_used_mb=_mib(memory, "used"),
            memory_free_mb=_mib(memory, "free"),
            utilization_percent=_int_field(utilization, "gpu"),
            memory_utilization_percent=_int_field(utilization, "memory"),
            temperature_c=self._temperature(handle),
            power_w=_watts(power_mw),
            power_limit_w=_watts(limit_mw),
            processes=self._processes(handle),
        )

    def _device_signature(self, index: int, present: int) -> tuple[int, int]:
        handle = self._handle(index, present)
        used_mb = _mib(self._memory(handle), "used")
        compute = self._query("nvmlDeviceGetComputeRunningProcesses", handle)
        return (-1 if used_mb is None else used_mb, len(compute or ()))

    def _lost_sample(self, index: int) -> GpuSample:
        identity = self._identities.get(index, _Identity(uuid=None, name=None))
        return GpuSample(
            index=index,
            uuid=identity.uuid,
            name=identity.name,
            memory_total_mb=None,
            memory_used_mb=None,
            memory_free_mb=None,
            utilization_percent=None,
            memory_utilization_percent=None,
            temperature_c=None,
            power_w=None,
            power_limit_w=None,
            processes=(),
            lost=True,
        )

    def _handle(self, index: int, present: int) -> Any:
        if index >= present:
            raise _DeviceLost(index)
        handle = self._handles.get(index)
        if handle is None:
            handle = self._query("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                raise _DeviceLost(index)  # no handle, no metrics: as good as lost
            # UUID and name never change, so ask once per handle rather than per sample.
            self._identities[index] = _Identity(
                uuid=_text(self._query("nvmlDeviceGetUUID", handle)),
                name=_text(self._query("nvmlDeviceGetName", handle)),
            )
            self._handles[index] = handle
        return handle

    def _memory(self, handle: Any) -> Any:
        # v2 separates driver-reserved memory from "used", which v1 lumps together.
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is not None and not self._memory_v2_unsupported:
            memory = self._query("nvmlDeviceGetMemoryInfo", handle, version=version)
            if memory is not None:
                return memory
        memory = self._query("nvmlDeviceGetMemoryInfo", handle)
        if memory is not None and version is not None:
            self._memory_v2_unsupported = True  # v1 answers where v2 did not: stop asking
        return memory

    def _temperature(self, handle: Any) -> int | None:
        sensor = self._nvml.NVML_TEMPERATURE_GPU
        celsius = self._query("nvmlDeviceGetTemperature", handle, sensor)
        if celsius is None:
            # Drivers from CUDA 14 on drop the old call; the versioned one replaces it.
            celsius = self._query("nvmlDeviceGetTemperatureV", handle, sensor)
        return None if celsius is None else int(celsius)

    def _processes(self, handle: Any) -> tuple[GpuProcessSample, ...]:
        compute = self._query("nvmlDeviceGetComputeRunningProcesses", handle) or []
        graphics = self._query("nvmlDeviceGetGraphicsRunningProcesses", handle) or []
        # A process that both computes and draws appears in both lists.
        by_pid: dict[int, GpuProcessSample] = {}
        for info in [*compute, *graphics]:
            pid = int(info.pid)
            if pid not in by_pid:
                by_pid[pid] = GpuProcessSample(
                    pid=pid,
                    used_mb=_process_mib(getattr(info, "usedGpuMemory", None)),
                    name=self._process_name(pid),
                )
        return tuple(by_pid.values())

    def _process_name(self, pid: int) -> str | None:
        name = _text(self._system_query("nvmlSystemGetProcessName", pid))
        return name or processes.name(pid)  # None: exited, or another PID namespace

    # ---- the one query wrapper ---------------------------------------------

    def _query(self, function: str, *args: Any, **kwargs: Any) -> Any:
        """Call one NVML function. Returns None when this metric cannot be had,
        raises _DeviceLost when the GPU stopped answering, GpuUnavailableError
        when the whole driver is gone."""
        call = getattr(self._nvml, function, None)
        if call is None:
            return None  # an older pynvml without this function
        try:
            return call(*args, **kwargs)
        except self._nvml.NVMLError as error:
            code = self._error_name(error)
            if code in _BACKEND_GONE_ERRORS:
                self._forget_session()
                raise GpuUnavailableError(self._unavailable_message(error, "query")) from None
            if code in _DEVICE_GONE_ERRORS:
                raise _DeviceLost(code) from error
            return None
        except getattr(self._nvml, "NVMLLibraryMismatchError", ()):
            return None  # pynvml newer than the driver: the function does not exist there

    def _system_query(self, function: str, *args: Any) -> Any:
        """A query about the system, not a GPU: "not found" there means no answer."""
        try:
            return self._query(function, *args)
        except _DeviceLost:
            return None

    def _error_name(self, error: Any) -> str | None:
        value = getattr(error, "value", None)
        for name in (*_BACKEND_GONE_ERRORS, *_DEVICE_GONE_ERRORS, "NVML_ERROR_NO_PERMISSION"):
            if getattr(self._nvml, name, None) == value:
                return name
        return None

    def _unavailable_message(self, error: Any, doing: str) -> str:
        known = _UNAVAILABLE_MESSAGES.get(self._error_name(error) or "")
        if known is not None:
            return known
        return f"NVML failed to {doing} ({error}): check that nvidia-smi works, {_SIM_HINT}"


# ---- pure conversions -----------------------------------------------------


def format_cuda_version(version: int | None) -> str | None:
    """NVML packs CUDA versions as 1000 * major + 10 * minor: 12040 is "12.4"."""
    if version is None or version <= 0:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def _text(value: object) -> str | None:
    # Some pynvml versions return bytes for strings.
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def _mib(struct: Any, field: str) -> int | None:
    value = getattr(struct, field, None)
    return None if value is None else int(value) // BYTES_PER_MIB


def _int_field(struct: Any, field: str) -> int | None:
    value = getattr(struct, field, None)
    return None if value is None else int(value)


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else round(milliwatts / MILLIWATTS_PER_WATT, 1)


def _process_mib(used_bytes: int | None) -> int | None:
    if used_bytes is None or used_bytes == NVML_VALUE_NOT_AVAILABLE_ULL or used_bytes < 0:
        return None
    return int(used_bytes) // BYTES_PER_MIB

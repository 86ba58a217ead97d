"""Real device memory for the simulated model server, through the CUDA driver API.

``python -m devtools.simserver --memory cuda`` holds its ``--vram-mb`` on a real NVIDIA GPU
instead of in the simulator's state file, so the agent's whole lifecycle (switches, sleep and
wake, memory coming back, NVML's process list) runs on a real card with no model to download
and no torch: ctypes on ``libcuda.so.1``, the driver itself.

The server's GPUs are the agent's indexes (NVML's, in PCI bus order). The process runtime sets
``CUDA_VISIBLE_DEVICES`` to them and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so inside the server the
i-th of its GPUs is CUDA device i; started by hand without ``CUDA_VISIBLE_DEVICES``, a GPU index
is the CUDA device of that number (in PCI bus order).

Memory is held in chunks of CHUNK_MB (the last one the remainder), each written once
(``cuMemsetD8``) so the driver really backs it; growing allocates chunks, shrinking frees them
from the end. The same small interface as ``devtools.gpu_sim.SimGpuClient``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

CHUNK_MB = 64
MIB = 1024 * 1024
LIBRARY = "libcuda.so.1"


class CudaError(RuntimeError):
    """The driver refused (its error name in the message), or there is no driver."""


class Driver(Protocol):
    """The calls this module makes, so its bookkeeping can be tested without a GPU."""

    def device_count(self) -> int: ...

    def allocate(self, device: int, size: int) -> int: ...

    def free(self, device: int, pointer: int) -> None: ...


class CudaDriver:
    """``libcuda`` through ctypes: one primary context per device, made current per call."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            self._cuda = ctypes.CDLL(library)
        except OSError as error:
            raise CudaError(
                f"no CUDA driver here ({library}: {error}); --memory cuda needs an NVIDIA GPU "
                "and its driver"
            ) from None
        # CUDA numbers devices fastest first unless told otherwise; NVML (the agent) numbers
        # them by PCI bus. The process runtime sets this; a server started by hand gets it too.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        self._check(self._cuda.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check(self._cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def allocate(self, device: int, size: int) -> int:
        self._use(device)
        pointer = ctypes.c_uint64()
        code = self._cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size))
        if code != 0:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            known = self._cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
            where = f" ({free.value // MIB} of {total.value // MIB} MiB free)" if known else ""
            self._check(code, f"cuMemAlloc of {size // MIB} MiB on device {device}{where}")
        self._check(
            self._cuda.cuMemsetD8_v2(pointer, ctypes.c_ubyte(0), ctypes.c_size_t(size)),
            "cuMemsetD8",
        )
        self._check(self._cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        return int(pointer.value)

    def free(self, device: int, pointer: int) -> None:
        self._use(device)
        self._check(self._cuda.cuMemFree_v2(ctypes.c_uint64(pointer)), "cuMemFree")

    def _use(self, device: int) -> None:
        context = self._contexts.get(device)
        if context is None:
            handle = ctypes.c_int()
            self._check(self._cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
            context = ctypes.c_void_p()
            self._check(
                self._cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle),
                "cuDevicePrimaryCtxRetain",
            )
            self._contexts[device] = context
        self._check(self._cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")

    def _check(self, code: int, call: str) -> None:
        if code == 0:
            return
        name = ctypes.c_char_p()
        self._cuda.cuGetErrorName(code, ctypes.byref(name))
        text = name.value.decode() if name.value else f"error {code}"
        raise CudaError(f"{call} failed: {text}")


@dataclass
class _Held:
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (pointer, MiB)

    @property
    def mb(self) -> int:
        return sum(size for _, size in self.chunks)


class CudaMemory:
    """Holds MiB on GPUs as ``SimGpuClient`` does, with real allocations."""

    def __init__(self, gpus: Sequence[int], driver: Driver | None = None) -> None:
        self.driver = driver if driver is not None else CudaDriver()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        # Inside a server the runtime started, its GPUs are the visible devices, in order.
        self._device = {gpu: (i if visible else gpu) for i, gpu in enumerate(gpus)}
        self._held: dict[int, _Held] = {}

    @property
    def gpu_count(self) -> int:
        """GPU indexes this process may use: those it was given (checked against the
        devices the driver shows)."""
        devices = self.driver.device_count()
        usable = [gpu for gpu, device in self._device.items() if device < devices]
        return max(usable) + 1 if len(usable) == len(self._device) else 0

    def set_usage(
        self, gpu: int, used_mb: int, *, utilization_percent: int = 0, name: str | None = None
    ) -> None:
        """Hold exactly ``used_mb`` MiB on ``gpu`` (utilization and name are the driver's
        to report: accepted for SimGpuClient's interface)."""
        if used_mb < 0:
            raise ValueError(f"used_mb must be 0 or more, not {used_mb}")
        device = self._device.get(gpu, gpu)
        held = self._held.setdefault(gpu, _Held())
        while held.chunks and held.mb > used_mb:
            pointer, _ = held.chunks.pop()
            self.driver.free(device, pointer)
        while held.mb < used_mb:
            size = min(CHUNK_MB, used_mb - held.mb)
            held.chunks.append((self.driver.allocate(device, size * MIB), size))

    def release(self) -> None:
        for gpu in list(self._held):
            self.set_usage(gpu, 0)

    def close(self) -> None:
        """Nothing to close: the driver frees what a process held when it exits."""

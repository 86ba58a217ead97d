"""NvmlBackend against a fake pynvml that raises pynvml's real exceptions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.gpu.base import DriverInfo, GpuProcessSample, GpuSample, GpuUnavailableError
from agent.gpu.nvml import NvmlBackend, format_cuda_version
from tests.fakes.fake_nvml import MIB, FakeDevice, FakeProcess, make_fake_nvml, nvml_error

NO_SUCH_PID = 99_999_999  # above any Linux pid_max, so /proc has no entry for it


def two_gpus() -> list[FakeDevice]:
    return [
        FakeDevice(
            uuid="GPU-aaaa",
            name="NVIDIA GeForce RTX 4090",
            memory_total_bytes=24_564 * MIB,
            memory_used_bytes=5_000 * MIB + 123,  # a partial MiB rounds down
            memory_reserved_bytes=300 * MIB,
            gpu_utilization_percent=87,
            memory_utilization_percent=45,
            temperature_c=66,
            power_mw=123_456,
            power_limit_mw=450_000,
            processes=[FakeProcess(pid=NO_SUCH_PID, used_memory_bytes=4_096 * MIB)],
        ),
        FakeDevice(
            uuid="GPU-bbbb",
            name="NVIDIA RTX A4000",
            memory_total_bytes=16_376 * MIB,
            memory_used_bytes=0,
            power_mw=14_949,
            power_limit_mw=140_000,
        ),
    ]


def open_backend(devices: list[FakeDevice], **options: Any) -> tuple[NvmlBackend, Any]:
    nvml = make_fake_nvml(devices, **options)
    return NvmlBackend(nvml=nvml), nvml


# ---- the fake itself ------------------------------------------------------


def test_fake_raises_pynvml_real_exception_classes() -> None:
    device = FakeDevice(unsupported={"nvmlDeviceGetPowerUsage"})
    nvml = make_fake_nvml([device])
    nvml.nvmlInit()

    with pytest.raises(pynvml.NVMLError_NotSupported) as excinfo:
        nvml.nvmlDeviceGetPowerUsage(nvml.nvmlDeviceGetHandleByIndex(0))

    assert isinstance(excinfo.value, pynvml.NVMLError)
    assert excinfo.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert nvml.NVMLError is pynvml.NVMLError
    assert nvml.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert nvml.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        make_fake_nvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).nvmlInit()


# ---- a full sample --------------------------------------------------------


def test_full_sample_converts_units() -> None:
    backend, _ = open_backend(two_gpus())

    first, second = backend.sample()

    assert first == GpuSample(
        index=0,
        uuid="GPU-aaaa",
        name="NVIDIA GeForce RTX 4090",
        memory_total_mb=24_564,
        memory_used_mb=5_000,
        # 24564 - 5000 - 300 MiB, less the 123 bytes that make a partial MiB
        memory_free_mb=19_263,
        utilization_percent=87,
        memory_utilization_percent=45,
        temperature_c=66,
        power_w=123.5,
        power_limit_w=450.0,
        processes=(GpuProcessSample(pid=NO_SUCH_PID, used_mb=4_096, name=None),),
        lost=False,
    )
    assert (second.index, second.uuid, second.memory_total_mb) == (1, "GPU-bbbb", 16_376)
    assert (second.memory_used_mb, second.power_w, second.power_limit_w) == (0, 14.9, 140.0)
    assert second.processes == ()


def test_driver_info_decodes_bytes_and_formats_cuda() -> None:
    backend, _ = open_backend(two_gpus(), strings_as_bytes=True, cuda_version=12040)

    assert backend.driver_info() == DriverInfo(
        backend="nvml", driver_version="550.54.15", cuda_version="12.4"
    )
    assert backend.sample()[0].name == "NVIDIA GeForce RTX 4090"


@pytest.mark.parametrize(
    ("packed", "text"),
    [(12040, "12.4"), (11080, "11.8"), (12010, "12.1"), (13000, "13.0"), (None, None), (0, None)],
)
def test_format_cuda_version(packed: int | None, text: str | None) -> None:
    assert format_cuda_version(packed) == text


def test_memory_falls_back_to_v1_when_v2_is_missing() -> None:
    backend, nvml = open_backend(two_gpus(), memory_v2_supported=False)

    first = backend.sample()[0]
    backend.sample()

    # v1 counts the driver-reserved 300 MiB as used.
    assert (first.memory_used_mb, first.memory_free_mb) == (5_300, 19_263)
    # Two devices tried v2 once between them, then the backend stopped asking.
    assert nvml.calls.count("nvmlDeviceGetMemoryInfo") == 1 + 4


# ---- metrics a card does not report -------------------------------------


def test_unsupported_metrics_become_none() -> None:
    device = FakeDevice(
        unsupported={
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetEnforcedPowerManagementLimit",
            "nvmlDeviceGetPowerManagementLimit",
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        }
    )
    backend, _ = open_backend([device], cuda_version=None)

    (sample,) = backend.sample()

    assert sample == GpuSample(
        index=0,
        uuid=device.uuid,
        name=device.name,
        memory_total_mb=None,
        memory_used_mb=None,
        memory_free_mb=None,
        utilization_percent=None,
        memory_utilization_percent=None,
        temperature_c=None,
        power_w=None,
        power_limit_w=None,
        processes=(),
        lost=False,
    )
    assert backend.driver_info().cuda_version is None
    assert backend.memory_signature() == (-1, 0)


def test_power_limit_falls_back_when_enforced_limit_is_unsupported() -> None:
    device = FakeDevice(
        power_limit_mw=250_000, unsupported={"nvmlDeviceGetEnforcedPowerManagementLimit"}
    )
    backend, _ = open_backend([device])

    assert backend.sample()[0].power_limit_w == 250.0


def test_no_permission_on_a_metric_is_not_fatal() -> None:
    backend, nvml = open_backend(two_gpus())

    def denied(handle: FakeDevice) -> int:
        raise nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)

    nvml.nvmlDeviceGetPowerUsage = denied

    first, _ = backend.sample()
    assert (first.power_w, first.temperature_c, first.lost) == (None, 66, False)


# ---- processes ----------------------------------------------------------


def test_processes_with_names_and_unknown_memory() -> None:
    own_comm = Path("/proc/self/comm").read_text().strip()
    device = FakeDevice(
        processes=[
            FakeProcess(pid=1234, used_memory_bytes=2_048 * MIB + 5),
            FakeProcess(pid=os.getpid(), used_memory_bytes=None),
            # NVML's "not available" sentinel, as older pynvml passes it through.
            FakeProcess(pid=NO_SUCH_PID, used_memory_bytes=(1 << 64) - 1),
            # Computes and draws: listed twice by NVML, once by us.
            FakeProcess(pid=1234, used_memory_bytes=2_048 * MIB, compute=False, graphics=True),
            FakeProcess(pid=777, used_memory_bytes=64 * MIB, compute=False, graphics=True),
        ]
    )
    backend, _ = open_backend([device], process_names={1234: "vllm", 777: "Xorg"})

    (sample,) = backend.sample()

    assert sample.processes == (
        GpuProcessSample(pid=1234, used_mb=2_048, name="vllm"),
        GpuProcessSample(pid=os.getpid(), used_mb=None, name=own_comm),  # from /proc
        GpuProcessSample(pid=NO_SUCH_PID, used_mb=None, name=None),
        GpuProcessSample(pid=777, used_mb=64, name="Xorg"),
    )


# ---- lifecycle ----------------------------------------------------------


def test_init_is_lazy_and_handles_are_cached() -> None:
    backend, nvml = open_backend(two_gpus())
    assert nvml.calls == []

    backend.driver_info()
    assert nvml.calls[0] == "nvmlInit"
    for _ in range(3):
        backend.sample()
        backend.memory_signature()

    assert nvml.calls.count("nvmlInit") == 1
    assert nvml.calls.count("nvmlDeviceGetHandleByIndex") == 2
    assert nvml.calls.count("nvmlDeviceGetUUID") == 2


def test_close_shuts_down_and_a_later_call_starts_again() -> None:
    backend, nvml = open_backend(two_gpus())
    backend.close()
    assert nvml.calls == []  # never started, nothing to shut down

    backend.sample()
    backend.close()
    assert nvml.calls[-1] == "nvmlShutdown"
    assert nvml.initialised is False

    assert backend.sample()[1].uuid == "GPU-bbbb"
    assert nvml.calls.count("nvmlInit") == 2


# ---- no usable NVML -------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "denied access"),
        (pynvml.NVML_ERROR_UNKNOWN, "Unknown Error"),
    ],
)
def test_init_failure_is_one_actionable_sentence(code: int, says: str) -> None:
    backend, _ = open_backend(two_gpus(), init_error=code)

    with pytest.raises(GpuUnavailableError) as excinfo:
        backend.sample()

    message = str(excinfo.value)
    assert says in message
    assert "--sim" in message
    assert "\n" not in message
    assert "Traceback" not in message
    assert excinfo.value.__suppress_context__  # raised "from None": no NVML chain shown


def test_no_devices_is_unavailable_and_shuts_nvml_down() -> None:
    backend, nvml = open_backend([])

    with pytest.raises(GpuUnavailableError, match=r"found no NVIDIA GPUs.*--sim"):
        backend.driver_info()
    assert nvml.initialised is False


def test_missing_pynvml_package_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail

    with pytest.raises(GpuUnavailableError, match=r"nvidia-ml-py.*--sim"):
        NvmlBackend().sample()


def test_driver_gone_mid_run_raises_unavailable() -> None:
    backend, nvml = open_backend(two_gpus())
    backend.sample()

    def driver_gone() -> int:
        raise nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    nvml.nvmlDeviceGetCount = driver_gone

    with pytest.raises(GpuUnavailableError, match="kernel driver is not loaded"):
        backend.sample()


# ---- a GPU that disappears ------------------------------------------------


def lost(index: int, uuid: str | None, name: str | None) -> GpuSample:
    return GpuSample(
        index=index,
        uuid=uuid,
        name=name,
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


def test_lost_gpu_is_reported_while_the_others_still_report() -> None:
    devices = two_gpus()
    backend, _ = open_backend(devices)
    before = backend.sample()

    devices[1].lost = True
    first, second = backend.sample()

    assert first == before[0]
    assert second == lost(1, "GPU-bbbb", "NVIDIA RTX A4000")
    assert backend.memory_signature() == (5_000, 1, -1, -1)

    devices[1].lost = False  # back after a reset: looked up afresh
    assert backend.sample() == before


def test_gpu_lost_in_the_middle_of_a_sample_keeps_its_identity() -> None:
    devices = two_gpus()
    devices[0].lose_after_calls = 3  # handle, UUID and name answer; memory does not
    backend, _ = open_backend(devices)

    first, second = backend.sample()

    assert first == lost(0, "GPU-aaaa", "NVIDIA GeForce RTX 4090")
    assert (second.uuid, second.memory_total_mb, second.lost) == ("GPU-bbbb", 16_376, False)


def test_unknown_error_on_a_known_gpu_means_lost() -> None:
    backend, nvml = open_backend(two_gpus())
    backend.sample()
    real_power = nvml.nvmlDeviceGetPowerUsage

    def power(handle: FakeDevice) -> int:
        if handle.uuid == "GPU-aaaa":
            raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)
        return int(real_power(handle))

    nvml.nvmlDeviceGetPowerUsage = power

    first, second = backend.sample()
    assert first == lost(0, "GPU-aaaa", "NVIDIA GeForce RTX 4090")
    assert (second.power_w, second.lost) == (14.9, False)


def test_shrinking_device_count_reports_the_missing_gpu_as_lost() -> None:
    devices = two_gpus()
    backend, _ = open_backend(devices)
    backend.sample()

    devices.pop()
    first, second = backend.sample()

    assert (first.uuid, first.lost) == ("GPU-aaaa", False)
    assert second == lost(1, "GPU-bbbb", "NVIDIA RTX A4000")


# ---- memory signature ---------------------------------------------------


def test_memory_signature_follows_memory_and_processes() -> None:
    devices = two_gpus()
    backend, _ = open_backend(devices)

    start = backend.memory_signature()
    assert start == (5_000, 1, 0, 0)
    assert backend.memory_signature() == start

    devices[1].memory_used_bytes = 1_024 * MIB
    assert backend.memory_signature() == (5_000, 1, 1_024, 0)

    devices[1].processes.append(FakeProcess(pid=4321, used_memory_bytes=1_024 * MIB))
    assert backend.memory_signature() == (5_000, 1, 1_024, 1)

    # Graphics-only processes do not count: only compute work competes for VRAM here.
    devices[1].processes.append(
        FakeProcess(pid=5, used_memory_bytes=0, compute=False, graphics=True)
    )
    assert backend.memory_signature() == (5_000, 1, 1_024, 1)

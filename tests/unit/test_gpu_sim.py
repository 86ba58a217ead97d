"""The simulated GPUs: a store shared by real processes, with driver-like release timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from agent.gpu.base import DriverInfo, GpuProcessSample, GpuSample, GpuUnavailableError
from devtools import gpu_sim as sim
from devtools.gpu_sim import (
    SimBackend,
    SimGpuClient,
    SimGpuError,
    SimGpuSpec,
    SimOutOfMemoryError,
    SimStoreError,
    SimStoreFullError,
    hold_allocation,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DELAY_S = 0.2
DEADLINE_S = 10.0
T = TypeVar("T")

# A simulated model server: holds memory through the client API, then waits for stdin to close.
HOLDER = """
import sys
from pathlib import Path
from devtools.gpu_sim import SimGpuClient

state, gpu, mb, util, name = sys.argv[1:6]
client = SimGpuClient(Path(state))
client.set_usage(int(gpu), int(mb), utilization_percent=int(util), name=name or None)
print("ready", flush=True)
sys.stdin.read()
"""

HOLD_ALLOCATION = """
import sys
from pathlib import Path
from devtools.gpu_sim import hold_allocation

state, mb, ramp, hold = sys.argv[1:5]
print("start", flush=True)
hold_allocation(Path(state), 0, int(mb), ramp_s=float(ramp),
                hold_s=None if hold == "none" else float(hold), name="alloc-test")
print("done", flush=True)
"""


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = DEADLINE_S) -> T:
    """Poll until ``condition`` returns a truthy value, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Children:
    """Child processes of one test; whatever is still running at the end is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def python(self, code: str, *args: object) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def holder(
        self, state: Path, gpu: int, mb: int, *, util: int = 0, name: str = "llama-server"
    ) -> subprocess.Popen[str]:
        proc = self.python(HOLDER, state, gpu, mb, util, name)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def sleeper(self) -> subprocess.Popen[str]:
        return self.python("import sys; sys.stdin.read()")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    group = Children()
    yield group
    group.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "modelbus-sim" / "gpus.bin"


@pytest.fixture
def backend(state: Path) -> Iterator[SimBackend]:
    specs = [
        SimGpuSpec(name="Sim A", memory_total_mb=8000, foreign_mb=1000),
        SimGpuSpec(name="Sim B", memory_total_mb=16000),
    ]
    with SimBackend(state, specs, release_delay_s=DELAY_S) as opened:
        yield opened


@pytest.fixture
def client(backend: SimBackend, state: Path) -> Iterator[SimGpuClient]:
    with SimGpuClient(state) as opened:
        yield opened


def used(backend: SimBackend, gpu: int = 0) -> int | None:
    return backend.sample()[gpu].memory_used_mb


# ---- the store -------------------------------------------------------------------------------


def test_fresh_store_reports_totals_and_foreign_usage(backend: SimBackend, state: Path) -> None:
    a, b = backend.sample()
    assert (a.index, a.name, a.memory_total_mb, a.memory_used_mb, a.memory_free_mb) == (
        0, "Sim A", 8000, 1000, 7000,
    )  # fmt: skip
    assert (b.index, b.name, b.memory_total_mb, b.memory_used_mb, b.memory_free_mb) == (
        1, "Sim B", 16000, 0, 16000,
    )  # fmt: skip
    assert a.processes == () and b.processes == ()
    assert (a.utilization_percent, a.temperature_c, a.power_w, a.power_limit_w) == (
        0, 35, 30.0, 450.0,
    )  # fmt: skip
    assert a.uuid is not None and a.uuid.startswith("GPU-sim-0-")
    assert b.uuid is not None and b.uuid.startswith("GPU-sim-1-") and a.uuid != b.uuid
    assert not a.lost
    assert backend.driver_info() == DriverInfo("sim", sim.SIM_DRIVER_VERSION, "12.4")
    assert backend.name == "sim"
    # Created complete under another name, then linked into place: no temp file is left.
    assert os.stat(state).st_mode & 0o777 == 0o666
    assert [p.name for p in state.parent.iterdir()] == ["gpus.bin"]


def test_uuid_is_stable_across_restarts(backend: SimBackend, state: Path) -> None:
    before = [gpu.uuid for gpu in backend.sample()]
    backend.close()
    with SimBackend(state, [SimGpuSpec(), SimGpuSpec()]) as again:
        assert [gpu.uuid for gpu in again.sample()] == before


def test_client_without_a_store_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SimStoreError, match=r"no simulated GPUs at .*gpu\.backend: sim"):
        SimGpuClient(tmp_path / "missing.bin")
    assert issubclass(SimStoreError, GpuUnavailableError)


def test_invalid_specs_are_refused(state: Path) -> None:
    with pytest.raises(ValueError, match="memory_total_mb"):
        SimGpuSpec(memory_total_mb=0)
    with pytest.raises(ValueError, match="idle_power_w"):
        SimGpuSpec(idle_power_w=500.0, power_limit_w=450.0)
    with pytest.raises(ValueError, match="at least one GPU"):
        SimBackend(state, [])


# ---- processes -------------------------------------------------------------------------------


def test_usage_set_in_another_process_is_seen_with_pid_and_name(
    backend: SimBackend, state: Path, children: Children
) -> None:
    server = children.holder(state, 1, 2500, util=40, name="llama-server")
    b = backend.sample()[1]
    assert (b.memory_used_mb, b.memory_free_mb, b.utilization_percent) == (2500, 13500, 40)
    assert b.processes == (GpuProcessSample(pid=server.pid, used_mb=2500, name="llama-server"),)
    assert backend.sample()[0].memory_used_mb == 1000  # the other GPU is untouched


def test_default_name_is_the_process_command_name(
    backend: SimBackend, state: Path, children: Children
) -> None:
    server = children.holder(state, 0, 100, name="")
    comm = Path(f"/proc/{server.pid}/comm").read_text().strip()
    assert backend.sample()[0].processes == (GpuProcessSample(server.pid, 100, comm),)


def test_one_process_on_two_gpus_uses_two_slots(backend: SimBackend, client: SimGpuClient) -> None:
    client.set_usage(0, 3000, name="tp")
    client.set_usage(1, 4000, name="tp")
    client.set_usage(0, 3500)  # updates the GPU 0 slot, keeps its name
    a, b = backend.sample()
    assert a.processes == (GpuProcessSample(os.getpid(), 3500, "tp"),)
    assert b.processes == (GpuProcessSample(os.getpid(), 4000, "tp"),)
    assert (a.memory_used_mb, b.memory_used_mb) == (4500, 4000)
    client.release(gpu=1)
    assert [len(gpu.processes) for gpu in backend.sample()] == [1, 0]


def test_explicit_release_returns_memory_only_after_the_delay(
    backend: SimBackend, client: SimGpuClient
) -> None:
    client.set_usage(0, 3000, name="srv")
    assert used(backend) == 4000
    released_at = time.monotonic()
    client.release()
    gpu = backend.sample()[0]
    # Still held (the driver has not given it back) but no longer anyone's process.
    assert (gpu.memory_used_mb, gpu.processes) == (4000, ())
    wait_for(lambda: used(backend) == 1000, "the released memory to come back")
    assert time.monotonic() - released_at >= DELAY_S
    assert backend.sample()[0].memory_free_mb == 7000


def test_release_with_zero_delay_is_immediate(state: Path) -> None:
    spec = SimGpuSpec(memory_total_mb=1000)
    with SimBackend(state, [spec], release_delay_s=0) as backend, SimGpuClient(state) as client:
        client.set_usage(0, 600)
        assert used(backend) == 600
        client.release()
        assert used(backend) == 0


@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_killed_process_memory_counts_until_the_delay_then_frees(
    backend: SimBackend, state: Path, children: Children, reaped: bool
) -> None:
    server = children.holder(state, 0, 4000, util=50)
    assert used(backend) == 5000
    server.send_signal(signal.SIGKILL)
    if reaped:
        server.wait(10)
    else:
        # Unreaped, the child stays a zombie, which must count as dead.
        wait_for(lambda: Path(f"/proc/{server.pid}/stat").read_text().split()[2] == "Z", "zombie")
    noticed_at = time.monotonic()
    gpu = backend.sample()[0]
    assert (gpu.memory_used_mb, gpu.processes, gpu.utilization_percent) == (5000, (), 0)
    wait_for(lambda: used(backend) == 1000, "the dead process's memory to come back")
    assert time.monotonic() - noticed_at >= DELAY_S


def test_reused_pid_is_not_mistaken_for_the_old_process(
    backend: SimBackend, client: SimGpuClient
) -> None:
    client.set_usage(0, 2000, name="old")
    store = client._store
    with store.locked(exclusive=True):
        (slot,) = [s for s in store.read_slots() if s.pid == os.getpid()]
        slot.start_time += 12345  # as if an earlier process had this pid
        store.write_slot(slot)
        store.commit()
    gpu = backend.sample()[0]
    assert (gpu.memory_used_mb, gpu.processes) == (3000, ())  # dead: releasing, unlisted
    # This process allocating now gets a slot of its own beside the releasing one.
    client.set_usage(0, 500, name="new")
    gpu = backend.sample()[0]
    assert gpu.memory_used_mb == 3500
    assert gpu.processes == (GpuProcessSample(os.getpid(), 500, "new"),)
    wait_for(lambda: used(backend) == 1500, "the old process's memory to come back")


# ---- memory_signature ------------------------------------------------------------------------


def test_signature_is_stable_when_nothing_changes(
    backend: SimBackend, client: SimGpuClient
) -> None:
    client.set_usage(0, 1000, utilization_percent=10, name="srv")
    signature = backend.memory_signature()
    backend.sample()  # nothing to reap: no write
    client.set_usage(0, 1000, utilization_percent=10, name="srv")  # same values: no write
    client.release(pid=os.getpid() + 1_000_000)  # nothing held: no write
    assert {backend.memory_signature() for _ in range(1000)} == {signature}


def test_signature_changes_on_allocation_and_when_a_release_becomes_due(
    backend: SimBackend, state: Path, children: Children
) -> None:
    idle = backend.memory_signature()
    server = children.holder(state, 0, 2000)
    allocated = backend.memory_signature()
    assert allocated != idle
    with SimGpuClient(state) as other:
        other.release(pid=server.pid)
    releasing = backend.memory_signature()
    assert releasing != allocated
    started = time.monotonic()
    # Nobody writes when the delay ends, yet the signature must move then, and not before.
    due = wait_for(
        lambda: (s := backend.memory_signature()) != releasing and s, "the release to fall due"
    )
    assert time.monotonic() - started >= DELAY_S * 0.5
    assert used(backend) == 1000
    settled = backend.memory_signature()
    assert settled not in (due, releasing)
    assert backend.memory_signature() == settled
    assert settled[1:] == (0,)  # no release pending any more


def test_signature_after_close_raises_gpu_unavailable(backend: SimBackend) -> None:
    backend.close()
    with pytest.raises(GpuUnavailableError, match="closed"):
        backend.memory_signature()
    backend.close()  # twice is fine


# ---- adopting and re-initialising ----------------------------------------------------------


def test_restart_with_same_gpu_count_adopts_slots_and_updates_specs(
    backend: SimBackend, state: Path, children: Children
) -> None:
    server = children.holder(state, 1, 3000, name="kept")
    backend.close()
    specs = [
        SimGpuSpec(name="New A", memory_total_mb=10000, foreign_mb=0),
        SimGpuSpec(name="New B", memory_total_mb=20000, foreign_mb=500, power_limit_w=300.0),
    ]
    with SimBackend(state, specs, release_delay_s=DELAY_S) as again:
        a, b = again.sample()
        assert (a.name, a.memory_total_mb, a.memory_used_mb) == ("New A", 10000, 0)
        assert (b.name, b.memory_total_mb, b.memory_used_mb, b.power_limit_w) == (
            "New B", 20000, 3500, 300.0,
        )  # fmt: skip
        assert b.processes == (GpuProcessSample(server.pid, 3000, "kept"),)


def test_different_gpu_count_reinitialises_and_clients_follow(
    backend: SimBackend, client: SimGpuClient, state: Path
) -> None:
    client.set_usage(0, 2000)
    backend.close()
    with SimBackend(state, [SimGpuSpec(memory_total_mb=4000, foreign_mb=100)] * 3) as again:
        samples = again.sample()
        assert [(g.memory_used_mb, g.processes) for g in samples] == [(100, ())] * 3
        # The client mapped the old file; it switches to the new one at its next call.
        client.set_usage(2, 700, name="moved")
        assert again.sample()[2].processes == (GpuProcessSample(os.getpid(), 700, "moved"),)
        assert client.gpu_count == 3


def test_unreadable_file_is_reinitialised(state: Path) -> None:
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a simulator store")
    with SimBackend(state, [SimGpuSpec(memory_total_mb=1234)]) as backend:
        assert used(backend) == 0 and backend.sample()[0].memory_total_mb == 1234
    with pytest.raises(SimStoreError, match="not a simulated-GPU state file"):
        state.write_bytes(b"garbage")
        SimGpuClient(state)


# ---- client errors -------------------------------------------------------------------------


def test_out_of_range_gpu_is_a_clear_error(client: SimGpuClient) -> None:
    with pytest.raises(SimGpuError, match=r"no simulated GPU 2: .* has GPUs 0-1"):
        client.set_usage(2, 100)
    with pytest.raises(SimGpuError, match="no simulated GPU -1"):
        client.set_foreign(-1, 100)
    with pytest.raises(SimGpuError, match="no simulated GPU 5"):
        client.release(gpu=5)
    with pytest.raises(SimGpuError, match="process 999999999 does not exist"):
        client.set_usage(0, 100, pid=999_999_999)
    with pytest.raises(ValueError, match="used_mb"):
        client.set_usage(0, -1)


def test_strict_mode_raises_out_of_memory_naming_requested_and_free(
    backend: SimBackend, state: Path, children: Children
) -> None:
    other = children.sleeper()
    with SimGpuClient(state) as loose, SimGpuClient(state, strict=True) as strict:
        loose.set_usage(0, 3000, pid=other.pid, name="other")  # 8000 - 1000 foreign - 3000
        with pytest.raises(SimOutOfMemoryError, match=r"tried to hold 5000 MiB .* 4000 MiB") as e:
            strict.set_usage(0, 5000)
        assert (e.value.gpu, e.value.requested_mb, e.value.free_mb) == (0, 5000, 4000)
        assert used(backend) == 4000  # the failed allocation left nothing behind
        strict.set_usage(0, 4000)
        strict.set_usage(0, 4000, utilization_percent=5)  # its own share does not count twice
        with pytest.raises(SimOutOfMemoryError):
            strict.set_usage(0, 4001)
        with pytest.raises(SimOutOfMemoryError, match="tried to hold 4001 MiB"):
            loose.set_usage(0, 4001, strict=True)  # per call, as well as per client
        # Without strict mode the card just reports itself full.
        loose.set_usage(1, 20000)
        b = backend.sample()[1]
        assert (b.memory_used_mb, b.memory_free_mb) == (16000, 0)


def test_full_slot_table_is_a_clear_error(client: SimGpuClient) -> None:
    client.set_usage(0, 1)
    store = client._store
    with store.locked(exclusive=True):
        slots = store.read_slots()
        template = next(s for s in slots if s.pid == os.getpid())
        for slot in slots:
            slot.pid, slot.start_time, slot.state = template.pid, template.start_time, 1
            store.write_slot(slot)
        store.commit()
    with pytest.raises(SimStoreFullError, match=f"all {sim.SLOT_COUNT} process slots"):
        client.set_usage(1, 100)


def test_foreign_usage_can_change_at_runtime(backend: SimBackend, client: SimGpuClient) -> None:
    signature = backend.memory_signature()
    client.set_foreign(1, 5000)
    assert backend.memory_signature() != signature
    b = backend.sample()[1]
    assert (b.memory_used_mb, b.memory_free_mb, b.processes) == (5000, 11000, ())


# ---- telemetry model ------------------------------------------------------------------------


def test_utilization_temperature_and_power_rise_with_process_load(
    backend: SimBackend, client: SimGpuClient, state: Path, children: Children
) -> None:
    def figures(sample: GpuSample) -> tuple[object, ...]:
        return (
            sample.utilization_percent,
            sample.memory_utilization_percent,
            sample.temperature_c,
            sample.power_w,
        )

    client.set_usage(0, 1000, utilization_percent=0)
    assert figures(backend.sample()[0]) == (0, 0, 35, 30.0)
    client.set_usage(0, 1000, utilization_percent=60)
    assert figures(backend.sample()[0]) == (60, 36, 65, 282.0)
    children.holder(state, 0, 1000, util=70)  # 60 + 70 caps at 100
    assert figures(backend.sample()[0]) == (100, 60, 85, 450.0)
    client.release()  # a releasing process causes no load
    assert figures(backend.sample()[0]) == (70, 42, 70, 324.0)


# ---- hold_allocation ------------------------------------------------------------------------


def test_hold_allocation_ramps_up_and_releases_on_sigterm(
    backend: SimBackend, state: Path, children: Children
) -> None:
    proc = children.python(HOLD_ALLOCATION, state, 3000, 0.4, "none")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    seen: set[int] = set()

    def ramped() -> bool:
        gpu = backend.sample()[0]
        seen.update(p.used_mb or 0 for p in gpu.processes)
        return gpu.processes == (GpuProcessSample(proc.pid, 3000, "alloc-test"),)

    wait_for(ramped, "the allocation to ramp up to 3000 MiB")
    assert any(0 < mb < 3000 for mb in seen), f"no intermediate step seen: {sorted(seen)}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stdout.readline().strip() == "done"
    gpu = backend.sample()[0]
    assert gpu.processes == ()  # released explicitly on SIGTERM, not reaped as dead
    wait_for(lambda: used(backend) == 1000, "the held memory to come back")


def test_hold_allocation_with_a_hold_time_returns_and_releases(
    backend: SimBackend, state: Path
) -> None:
    hold_allocation(state, 1, 1500, hold_s=0.05)
    b = backend.sample()[1]
    assert (b.memory_used_mb, b.processes) == (1500, ())  # released, coming back after delay
    wait_for(lambda: used(backend, 1) == 0, "the held memory to come back")


def readable(fd: int, timeout: float) -> bool:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def test_change_signal_wakes_on_writes_from_another_process(
    backend: SimBackend, state: Path, children: Children
) -> None:
    signal_ = backend.change_signal()
    assert backend.change_signal() is signal_  # one listener per backend
    assert not readable(signal_.fileno(), 0)
    assert signal_.next_due_s() is None
    server = children.holder(state, 0, 1200)
    assert readable(signal_.fileno(), DEADLINE_S)
    signal_.drain()
    assert not readable(signal_.fileno(), 0)
    # The agent's own upkeep does not wake itself.
    backend.sample()
    assert not readable(signal_.fileno(), 0)
    # A release is announced, and says when its memory will come back.
    server.kill()
    server.wait(10)
    backend.sample()  # notices the death: the memory comes back after the delay
    due = signal_.next_due_s()
    assert due is not None and 0 <= due <= DELAY_S


def test_only_one_agent_may_listen(backend: SimBackend, state: Path) -> None:
    backend.change_signal()
    with (
        SimBackend(state, [SimGpuSpec(), SimGpuSpec()]) as second,
        pytest.raises(GpuUnavailableError, match="already watches"),
    ):
        second.change_signal()

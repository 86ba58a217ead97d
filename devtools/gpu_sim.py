"""Simulated GPUs whose state lives in one mmap'd file shared by every process on the host.

The agent reads it through :class:`SimBackend`; simulated model servers and ``modelbus sim``
write to it through :class:`SimGpuClient`. It behaves like a driver in the ways the agent
cares about: memory held by a process that released it or died comes back ``release_delay_s``
later, and memory used by processes modelbus does not manage ("foreign") is set per GPU.

Binary layout (little-endian, version 1; the file never changes size after creation):

=========  ======  =====================================================================
offset     size    content
=========  ======  =====================================================================
0          64      header: magic ``b"MBSIMGPU"``, layout version u32, GPU count u32,
                   slot count u32, reserved u32, generation u64 (offset 24),
                   earliest pending release_at f64 (offset 32, ``inf`` when none),
                   release_delay_s f64 (offset 40), padding
64         128*N   one row per GPU: name 64s (UTF-8, NUL padded), memory_total_mb u64,
                   foreign_mb u64, power_limit_w f64, idle_power_w f64, padding
64+128*N   96*256  process slots: pid u32, state u8 (0 free, 1 active, 2 releasing), 3 pad,
                   gpu u32, utilization_percent u32, process start time u64 (hundredths
                   of a second since the epoch, as ``agent.processes`` reads it), used_mb u64,
                   release_at f64 (``time.time()``, shared by all processes), name 56s
=========  ======  =====================================================================

Concurrency: writers hold ``flock(LOCK_EX)`` on the file and bump the generation last;
full reads hold ``LOCK_SH``. :meth:`SimBackend.memory_signature` reads the generation and
the earliest pending release straight from the mapping without a lock or a syscall: a torn
read can only produce a spurious difference (one extra sample), never hide a change, because
the next poll reads the settled value. The file is created complete under a temporary name
and then linked into place, so no process ever sees it half written; re-initialising (a
different GPU count) replaces it the same way, and every other process switches to the new
file the next time it takes the lock.

A slot is keyed by (pid, process start time, gpu): one process holding memory on two GPUs
uses two slots, and a reused pid is never mistaken for the process that held it before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import mmap
import os
import select
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from agent import processes
from agent.gpu.base import DriverInfo, GpuProcessSample, GpuSample, GpuUnavailableError

log = logging.getLogger(__name__)

MAGIC = b"MBSIMGPU"
LAYOUT_VERSION = 1
SLOT_COUNT = 256
SIM_DRIVER_VERSION = f"sim-{LAYOUT_VERSION}"
SIM_CUDA_VERSION = "12.4"
FILE_MODE = 0o666

# Telemetry model: an idle card sits at ambient temperature and idle power; both rise
# linearly with utilization, and the memory controller is busy in proportion.
AMBIENT_C = 35.0
HEAT_C_PER_UTIL_PERCENT = 0.5
MEMORY_BUSY_PER_UTIL_PERCENT = 0.6
# hold_allocation() raises usage in steps this far apart while ramping up.
RAMP_STEP_S = 0.05

_HEADER = struct.Struct("<8sIIIIQdd")
_HEADER_SIZE = 64
_SIGNATURE = struct.Struct("<Qd")  # generation, earliest pending release_at
_GENERATION_OFFSET = 24
_RELEASE_DELAY = struct.Struct("<d")
_RELEASE_DELAY_OFFSET = 40
_GPU = struct.Struct("<64sQQdd")
_GPU_SIZE = 128
_SLOT = struct.Struct("<IBxxxIIQQd56s")
_SLOT_SIZE = _SLOT.size
_NAME_BYTES = 56
_GPU_NAME_BYTES = 64

_FREE, _ACTIVE, _RELEASING = 0, 1, 2

_CREATE_ATTEMPTS = 10


class SimStoreError(GpuUnavailableError):
    """The state file is missing, unreadable or not a simulator store."""


class SimGpuError(RuntimeError):
    """A request the simulated driver refuses (bad GPU index, no free slot, ...)."""


class SimStoreFullError(SimGpuError):
    """Every process slot of the store is taken."""


class SimOutOfMemoryError(SimGpuError):
    """Strict mode: the allocation does not fit, as CUDA would report out of memory."""

    def __init__(self, gpu: int, requested_mb: int, free_mb: int, total_mb: int) -> None:
        super().__init__(
            f"simulated GPU {gpu} is out of memory: tried to hold {requested_mb} MiB "
            f"but only {free_mb} MiB of {total_mb} MiB is free for this process"
        )
        self.gpu = gpu
        self.requested_mb = requested_mb
        self.free_mb = free_mb
        self.total_mb = total_mb


@dataclass(frozen=True, slots=True)
class SimGpuSpec:
    name: str = "Simulated GPU"
    memory_total_mb: int = 32768
    foreign_mb: int = 0
    power_limit_w: float = 450.0
    idle_power_w: float = 30.0

    def __post_init__(self) -> None:
        if self.memory_total_mb <= 0:
            raise ValueError(f"memory_total_mb must be positive, not {self.memory_total_mb}")
        if self.foreign_mb < 0:
            raise ValueError(f"foreign_mb must be 0 or more, not {self.foreign_mb}")
        if not 0 <= self.idle_power_w <= self.power_limit_w:
            raise ValueError(
                f"idle_power_w ({self.idle_power_w}) must lie between 0 and "
                f"power_limit_w ({self.power_limit_w})"
            )


# ---- process identity --------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """When a live process started, in hundredths of a second since the epoch (what a
    slot holds), or None when it is gone or a zombie."""
    started = processes.start_time(pid)
    return None if started is None else round(started * 100)


def _holds_slot(slot: _Slot) -> bool:
    """Whether the process that took ``slot`` is still alive (not a newer one with its pid)."""
    started = processes.start_time(slot.pid)
    return started is not None and processes.same_start(started, slot.start_time / 100)


class _Holders:
    """Whether the processes holding slots still live, cheaply: each is checked once
    through psutil (pid and start time), then watched through a pidfd, which turns
    readable when that very process exits (zombie or not, whatever reuses its pid).
    One poll per slot instead of /proc reads on every sample."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[tuple[int, int], int] = {}  # (pid, start time) -> pidfd

    def alive(self, slot: _Slot) -> bool:
        key = (slot.pid, slot.start_time)
        with self._lock:
            fd = self._watched.get(key)
            if fd is not None:
                if not select.select([fd], [], [], 0)[0]:
                    return True
                del self._watched[key]
                os.close(fd)
                return False
            if not _holds_slot(slot):
                return False
            try:
                fd = os.pidfd_open(slot.pid)
            except (OSError, AttributeError):  # no pidfds here: psutil every time
                return True
            if not _holds_slot(slot):  # its pid was reused between the two looks
                os.close(fd)
                return False
            self._watched[key] = fd
            return True

    def forget_others(self, slots: Sequence[_Slot]) -> None:
        """Close the pidfds of processes that hold no slot any more."""
        held = {(slot.pid, slot.start_time) for slot in slots if slot.state == _ACTIVE}
        with self._lock:
            for key in [key for key in self._watched if key not in held]:
                os.close(self._watched.pop(key))

    def close(self) -> None:
        self.forget_others(())


def _process_name(pid: int) -> str:
    return processes.name(pid) or f"pid{pid}"


def _encode_name(name: str, size: int) -> bytes:
    # Truncate on a character boundary so the stored name always decodes.
    return name.encode("utf-8")[:size].decode("utf-8", "ignore").encode("utf-8")


def _decode_name(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


# ---- the store -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    pid: int
    state: int
    gpu: int
    utilization_percent: int
    start_time: int
    used_mb: int
    release_at: float
    name: bytes

    def pack(self) -> bytes:
        return _SLOT.pack(
            self.pid,
            self.state,
            self.gpu,
            self.utilization_percent,
            self.start_time,
            self.used_mb,
            self.release_at,
            self.name,
        )

    def clear(self) -> None:
        self.pid = self.gpu = self.utilization_percent = self.start_time = self.used_mb = 0
        self.state, self.release_at, self.name = _FREE, 0.0, b""

    def holds_memory(self, now: float) -> bool:
        return self.state == _ACTIVE or (self.state == _RELEASING and self.release_at > now)


@dataclass(slots=True)
class _GpuRow:
    name: bytes
    memory_total_mb: int
    foreign_mb: int
    power_limit_w: float
    idle_power_w: float

    @classmethod
    def from_spec(cls, spec: SimGpuSpec) -> _GpuRow:
        return cls(
            _encode_name(spec.name, _GPU_NAME_BYTES),
            spec.memory_total_mb,
            spec.foreign_mb,
            float(spec.power_limit_w),
            float(spec.idle_power_w),
        )

    def pack(self) -> bytes:
        return _GPU.pack(
            self.name, self.memory_total_mb, self.foreign_mb, self.power_limit_w, self.idle_power_w
        )


def _file_size(gpu_count: int, slot_count: int) -> int:
    return _HEADER_SIZE + gpu_count * _GPU_SIZE + slot_count * _SLOT_SIZE


def _image(specs: Sequence[SimGpuSpec], release_delay_s: float) -> bytes:
    image = bytearray(_file_size(len(specs), SLOT_COUNT))
    _HEADER.pack_into(
        image, 0, MAGIC, LAYOUT_VERSION, len(specs), SLOT_COUNT, 0, 0, math.inf, release_delay_s
    )
    for index, spec in enumerate(specs):
        image[_HEADER_SIZE + index * _GPU_SIZE :][: _GPU.size] = _GpuRow.from_spec(spec).pack()
    return bytes(image)


def _write_temp(path: Path, image: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, image)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def _layout(fd: int) -> tuple[int, int] | None:
    """(GPU count, slot count) when the open file is a complete store of our version."""
    size = os.fstat(fd).st_size
    if size < _HEADER_SIZE:
        return None
    header = os.pread(fd, _HEADER.size, 0)
    magic, version, gpu_count, slot_count = _HEADER.unpack(header)[:4]
    if magic != MAGIC or version != LAYOUT_VERSION or gpu_count < 1 or slot_count < 1:
        return None
    if size != _file_size(gpu_count, slot_count):
        return None
    return gpu_count, slot_count


class _Store:
    """One open mapping of the state file plus the locking protocol around it."""

    def __init__(self, path: Path, fd: int) -> None:
        layout = _layout(fd)
        if layout is None:
            os.close(fd)
            raise SimStoreError(
                f"{path} is not a simulated-GPU state file of layout version {LAYOUT_VERSION}; "
                "delete it and restart the agent with gpu.backend: sim"
            )
        self.path = path
        self.fd = fd
        self.gpu_count, self.slot_count = layout
        self.mm = mmap.mmap(fd, _file_size(*layout))
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)
        self._holders = _Holders()
        self._gpu_offset = _HEADER_SIZE
        self._slot_offset = _HEADER_SIZE + self.gpu_count * _GPU_SIZE
        # flock excludes other open files, not other threads sharing this descriptor.
        self._thread_lock = threading.Lock()
        self._uuid_tag = hashlib.blake2s(str(path).encode(), digest_size=4).hexdigest()

    @classmethod
    def open_existing(cls, path: Path) -> _Store:
        path = path.resolve()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SimStoreError(
                f"no simulated GPUs at {path}: start the agent with gpu.backend: sim first"
            ) from None
        except OSError as exc:
            raise SimStoreError(f"cannot open the simulated GPUs at {path}: {exc}") from exc
        return cls(path, fd)

    @classmethod
    def create_or_adopt(
        cls, path: Path, specs: Sequence[SimGpuSpec], release_delay_s: float
    ) -> _Store:
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_CREATE_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                cls._publish_new(path, specs, release_delay_s, replace=False)
                continue
            except OSError as exc:
                raise SimStoreError(f"cannot open the simulated GPUs at {path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                stat, current = os.fstat(fd), os.stat(path)
                if (stat.st_dev, stat.st_ino) != (current.st_dev, current.st_ino):
                    raise FileNotFoundError  # replaced while we waited: look again
                layout = _layout(fd)
                if layout is None or layout[0] != len(specs):
                    found = "an unreadable file" if layout is None else f"{layout[0]} GPU(s)"
                    log.warning(
                        "re-initialising %s for %d GPU(s): it held %s", path, len(specs), found
                    )
                    cls._publish_new(path, specs, release_delay_s, replace=True)
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(fd)  # also drops the lock
                continue
            except BaseException:
                os.close(fd)
                raise
            store = cls(path, fd)  # takes over fd, still locked
            try:
                store._adopt(specs, release_delay_s)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return store
        raise SimStoreError(
            f"{path} keeps being replaced by another process: "
            "make sure only one agent uses this simulator state file"
        )

    @staticmethod
    def _publish_new(
        path: Path, specs: Sequence[SimGpuSpec], release_delay_s: float, *, replace: bool
    ) -> None:
        temp = _write_temp(path, _image(specs, release_delay_s))
        try:
            if replace:
                os.replace(temp, path)
                return
            try:
                # link() fails when the name exists, so two creators cannot clobber each other.
                os.link(temp, path)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                os.replace(temp, path)  # no hard links on this file system
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _adopt(self, specs: Sequence[SimGpuSpec], release_delay_s: float) -> None:
        for index, spec in enumerate(specs):
            self.write_gpu(index, _GpuRow.from_spec(spec))
        _RELEASE_DELAY.pack_into(self.mm, _RELEASE_DELAY_OFFSET, release_delay_s)
        self.commit()

    # -- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        with self._thread_lock:
            if self.mm.closed:
                raise SimStoreError(f"the simulated GPUs at {self.path} were closed")
            while True:
                fcntl.flock(self.fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                if not self._replaced():
                    break
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._switch_to_current_file()
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _replaced(self) -> bool:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False  # removed: keep the mapping we have rather than fail
        return (stat.st_dev, stat.st_ino) != self._identity

    def _switch_to_current_file(self) -> None:
        fresh = _Store.open_existing(self.path)
        log.info("simulated GPU store %s was re-initialised; following it", self.path)
        self.mm.close()
        os.close(self.fd)
        self.fd, self.mm, self._identity = fresh.fd, fresh.mm, fresh._identity
        self.gpu_count, self.slot_count = fresh.gpu_count, fresh.slot_count
        self._slot_offset = fresh._slot_offset

    # -- raw access (call under the lock) ----------------------------------------------------

    def release_delay_s(self) -> float:
        (delay,) = _RELEASE_DELAY.unpack_from(self.mm, _RELEASE_DELAY_OFFSET)
        return float(delay)

    def read_gpus(self) -> list[_GpuRow]:
        rows = []
        for index in range(self.gpu_count):
            fields = _GPU.unpack_from(self.mm, self._gpu_offset + index * _GPU_SIZE)
            rows.append(_GpuRow(*fields))
        return rows

    def write_gpu(self, index: int, row: _GpuRow) -> None:
        start = self._gpu_offset + index * _GPU_SIZE
        self.mm[start : start + _GPU.size] = row.pack()

    def read_slots(self) -> list[_Slot]:
        table = self.mm[self._slot_offset : self._slot_offset + self.slot_count * _SLOT_SIZE]
        return [_Slot(index, *fields) for index, fields in enumerate(_SLOT.iter_unpack(table))]

    def write_slot(self, slot: _Slot) -> None:
        start = self._slot_offset + slot.index * _SLOT_SIZE
        self.mm[start : start + _SLOT_SIZE] = slot.pack()

    def commit(self, slots: Sequence[_Slot] | None = None, *, announce: bool = True) -> None:
        """Publish a change: refresh the earliest pending release, bump the generation,
        and (unless the agent itself made the change) wake the agent's change signal."""
        if slots is None:
            slots = self.read_slots()
        pending = [s.release_at for s in slots if s.state == _RELEASING]
        generation, _ = _SIGNATURE.unpack_from(self.mm, _GENERATION_OFFSET)
        earliest = min(pending, default=math.inf)
        _SIGNATURE.pack_into(self.mm, _GENERATION_OFFSET, (generation + 1) % 2**64, earliest)
        if announce:
            _announce_change(self.path)

    def earliest_release_at(self) -> float:
        _, earliest = _SIGNATURE.unpack_from(self.mm, _GENERATION_OFFSET)
        return float(earliest)

    # -- driver behaviour --------------------------------------------------------------------

    def start_release(self, slot: _Slot, now: float) -> None:
        delay = self.release_delay_s()
        if delay <= 0:
            slot.clear()
        else:
            slot.state, slot.release_at, slot.utilization_percent = _RELEASING, now + delay, 0
        self.write_slot(slot)

    def needs_upkeep(self, slots: Sequence[_Slot], now: float) -> bool:
        self._holders.forget_others(slots)
        for slot in slots:
            if slot.state == _RELEASING and slot.release_at <= now:
                return True
            if slot.state == _ACTIVE and not self._holders.alive(slot):
                return True
        return False

    def upkeep(self, slots: Sequence[_Slot], now: float) -> bool:
        """Under LOCK_EX: start releasing the memory of dead processes and free the slots
        whose release is due. True when anything changed (the caller commits)."""
        changed = False
        for slot in slots:
            if slot.state == _RELEASING and slot.release_at <= now:
                slot.clear()
                self.write_slot(slot)
                changed = True
            elif slot.state == _ACTIVE and not self._holders.alive(slot):
                self.start_release(slot, now)
                changed = True
        return changed

    def sample(self) -> tuple[GpuSample, ...]:
        now = time.time()
        with self.locked(exclusive=False):
            gpus, slots = self.read_gpus(), self.read_slots()
            upkeep = self.needs_upkeep(slots, now)
        if upkeep:
            # flock cannot upgrade atomically, so read again under the write lock.
            with self.locked(exclusive=True):
                gpus, slots = self.read_gpus(), self.read_slots()
                if self.upkeep(slots, now):
                    self.commit(slots, announce=False)
        return tuple(self._gpu_sample(index, row, slots, now) for index, row in enumerate(gpus))

    def _gpu_sample(
        self, index: int, row: _GpuRow, slots: Sequence[_Slot], now: float
    ) -> GpuSample:
        mine = [s for s in slots if s.gpu == index and s.holds_memory(now)]
        total = row.memory_total_mb
        used = min(total, row.foreign_mb + sum(s.used_mb for s in mine))
        active = sorted((s for s in mine if s.state == _ACTIVE), key=lambda s: s.pid)
        utilization = min(100, sum(s.utilization_percent for s in active))
        power = row.idle_power_w + (row.power_limit_w - row.idle_power_w) * utilization / 100
        return GpuSample(
            index=index,
            uuid=f"GPU-sim-{index}-{self._uuid_tag}",
            name=_decode_name(row.name),
            memory_total_mb=total,
            memory_used_mb=used,
            memory_free_mb=total - used,
            utilization_percent=utilization,
            memory_utilization_percent=round(utilization * MEMORY_BUSY_PER_UTIL_PERCENT),
            temperature_c=round(AMBIENT_C + utilization * HEAT_C_PER_UTIL_PERCENT),
            power_w=round(power, 1),
            power_limit_w=row.power_limit_w,
            processes=tuple(
                GpuProcessSample(pid=s.pid, used_mb=s.used_mb, name=_decode_name(s.name))
                for s in active
            ),
        )

    def check_gpu(self, gpu: int) -> None:
        if not 0 <= gpu < self.gpu_count:
            raise SimGpuError(
                f"there is no simulated GPU {gpu}: {self.path} has GPUs 0-{self.gpu_count - 1}"
            )

    def close(self) -> None:
        with self._thread_lock:
            if not self.mm.closed:
                self.mm.close()
                os.close(self.fd)
        self._holders.close()


# ---- change notification ---------------------------------------------------------------------


def _signal_address(path: Path) -> bytes:
    """A Linux abstract-namespace socket name derived from the state file: no file to
    clean up, no 108-byte path limit, shared by every process on the host."""
    digest = hashlib.blake2s(str(path.resolve()).encode(), digest_size=8).hexdigest()
    return b"\0modelbus-sim-" + digest.encode()


def _announce_change(path: Path) -> None:
    """Best effort: nobody listening (no agent) or a full queue (the agent will sample
    anyway) are both fine."""
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        sender.setblocking(False)
        sender.sendto(b"\x01", _signal_address(path))


class SimChangeSignal:
    """The agent's end of the notifications writers send after every change."""

    def __init__(self, store: _Store) -> None:
        self._store = store
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.bind(_signal_address(store.path))
        except OSError as exc:
            self._socket.close()
            raise SimStoreError(
                f"another agent already watches the simulated GPUs at {store.path} ({exc})"
            ) from None

    def fileno(self) -> int:
        return self._socket.fileno()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                self._socket.recv(64)

    def next_due_s(self) -> float | None:
        earliest = self._store.earliest_release_at()
        if not math.isfinite(earliest):
            return None
        return max(0.0, earliest - time.time())

    def close(self) -> None:
        self._socket.close()


# ---- the agent's backend ---------------------------------------------------------------------


class SimBackend:
    """GpuBackend over the shared store. Processes whose memory is being released (after
    ``release()`` or death) are no longer listed, as on a real card, but their memory still
    counts as used until ``release_delay_s`` has passed. A death is noticed at the next
    ``sample()``; the release delay runs from then."""

    name = "sim"

    def __init__(
        self, state_file: Path, gpus: Sequence[SimGpuSpec], release_delay_s: float = 0.5
    ) -> None:
        if not gpus:
            raise ValueError("the simulator needs at least one GPU")
        if release_delay_s < 0 or not math.isfinite(release_delay_s):
            raise ValueError(f"release_delay_s must be 0 or more, not {release_delay_s}")
        self.state_file = Path(state_file)
        self._store = _Store.create_or_adopt(self.state_file, gpus, release_delay_s)
        self._signal: SimChangeSignal | None = None

    def driver_info(self) -> DriverInfo:
        return DriverInfo(
            backend=self.name, driver_version=SIM_DRIVER_VERSION, cuda_version=SIM_CUDA_VERSION
        )

    def sample(self) -> tuple[GpuSample, ...]:
        """Every GPU, after marking dead processes' memory as releasing and freeing the
        releases that are due (each such change bumps the generation)."""
        return self._store.sample()

    def memory_signature(self) -> tuple[int, ...]:
        """(generation, 1 if the earliest pending release is due else 0). The generation moves
        on every write; the second element flips when a release becomes due, which no process
        writes down, so the agent samples then and ``sample()`` frees it (bumping the
        generation and resetting the flag). One lock-free mmap read and a vDSO clock read."""
        try:
            generation, earliest = _SIGNATURE.unpack_from(self._store.mm, _GENERATION_OFFSET)
        except ValueError:
            raise SimStoreError(f"the simulated GPUs at {self.state_file} were closed") from None
        return (generation, int(time.time() >= earliest))

    def change_signal(self) -> SimChangeSignal:
        """Created on first use: only the agent listens, and only one may."""
        if self._signal is None:
            self._signal = SimChangeSignal(self._store)
        return self._signal

    def close(self) -> None:
        if self._signal is not None:
            self._signal.close()
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---- the client for simulated model servers ----------------------------------------------------


class SimGpuClient:
    """Allocate and free simulated GPU memory from any process on the host.

    With ``strict=True``, an allocation larger than the GPU's free memory (plus what this
    process already holds there) raises :class:`SimOutOfMemoryError`, as CUDA would; by
    default it is recorded anyway and the GPU reports itself full."""

    def __init__(self, state_file: Path, *, strict: bool = False) -> None:
        self.state_file = Path(state_file)
        self.strict = strict
        self._store = _Store.open_existing(self.state_file)

    @property
    def gpu_count(self) -> int:
        return self._store.gpu_count

    def set_usage(
        self,
        gpu: int,
        used_mb: int,
        *,
        utilization_percent: int = 0,
        name: str | None = None,
        pid: int | None = None,
        strict: bool | None = None,
    ) -> None:
        """Make process ``pid`` (default: this one) hold ``used_mb`` MiB on ``gpu``,
        creating its slot on first use; ``name`` defaults to the process's command name.
        ``strict`` overrides the client's setting for this call."""
        if used_mb < 0:
            raise ValueError(f"used_mb must be 0 or more, not {used_mb}")
        if not 0 <= utilization_percent <= 100:
            raise ValueError(f"utilization_percent must be 0-100, not {utilization_percent}")
        pid = os.getpid() if pid is None else pid
        start_time = process_start_time(pid)
        if start_time is None:
            raise SimGpuError(f"process {pid} does not exist, so it cannot hold GPU memory")
        now = time.time()
        store = self._store
        with store.locked(exclusive=True):
            store.check_gpu(gpu)
            slots = store.read_slots()
            # Upkeep also releases a slot left behind by an earlier process with this pid.
            changed = store.upkeep(slots, now)
            try:
                wrote = self._set_slot(
                    store,
                    slots,
                    gpu,
                    used_mb,
                    utilization_percent,
                    name,
                    pid,
                    start_time,
                    now,
                    strict=self.strict if strict is None else strict,
                )
                changed = changed or wrote
            finally:
                if changed:
                    store.commit(slots)

    def _set_slot(
        self,
        store: _Store,
        slots: Sequence[_Slot],
        gpu: int,
        used_mb: int,
        utilization_percent: int,
        name: str | None,
        pid: int,
        start_time: int,
        now: float,
        *,
        strict: bool,
    ) -> bool:
        slot = next(
            (s for s in slots if s.state == _ACTIVE and s.pid == pid and s.gpu == gpu), None
        )
        if strict:
            self._check_fits(store, gpu, used_mb, slots, slot, now)
        new = slot is None
        if slot is None:
            slot = next((s for s in slots if s.state == _FREE), None)
            if slot is None:
                raise SimStoreFullError(
                    f"all {store.slot_count} process slots of {store.path} are in use; "
                    "release some simulated allocations first"
                )
            slot.pid, slot.gpu, slot.start_time, slot.state = pid, gpu, start_time, _ACTIVE
            slot.name = _encode_name(name or _process_name(pid), _NAME_BYTES)
        before = slot.pack()
        if name is not None:
            slot.name = _encode_name(name, _NAME_BYTES)
        slot.used_mb, slot.utilization_percent = used_mb, utilization_percent
        # Writing the same values again is not a change: the generation stays put.
        if new or slot.pack() != before:
            store.write_slot(slot)
            return True
        return False

    def _check_fits(
        self,
        store: _Store,
        gpu: int,
        used_mb: int,
        slots: Sequence[_Slot],
        own: _Slot | None,
        now: float,
    ) -> None:
        row = store.read_gpus()[gpu]
        others = sum(
            s.used_mb for s in slots if s.gpu == gpu and s.holds_memory(now) and s is not own
        )
        free = max(0, row.memory_total_mb - row.foreign_mb - others)
        if used_mb > free:
            raise SimOutOfMemoryError(gpu, used_mb, free, row.memory_total_mb)

    def release(self, pid: int | None = None, *, gpu: int | None = None) -> None:
        """Free what ``pid`` (default: this process) holds, on every GPU or only ``gpu``:
        the memory comes back ``release_delay_s`` later, as the agent configured it."""
        pid = os.getpid() if pid is None else pid
        now = time.time()
        store = self._store
        with store.locked(exclusive=True):
            if gpu is not None:
                store.check_gpu(gpu)
            slots = store.read_slots()
            changed = store.upkeep(slots, now)
            for slot in slots:
                if slot.state == _ACTIVE and slot.pid == pid and gpu in (None, slot.gpu):
                    store.start_release(slot, now)
                    changed = True
            if changed:
                store.commit(slots)

    def set_foreign(self, gpu: int, mb: int) -> None:
        """Memory used on ``gpu`` by processes modelbus does not manage."""
        if mb < 0:
            raise ValueError(f"foreign memory must be 0 MiB or more, not {mb}")
        store = self._store
        with store.locked(exclusive=True):
            store.check_gpu(gpu)
            row = store.read_gpus()[gpu]
            if row.foreign_mb != mb:
                row.foreign_mb = mb
                store.write_gpu(gpu, row)
                store.commit()

    def snapshot(self) -> tuple[GpuSample, ...]:
        """What the agent's backend would report now (dead processes are reaped here too)."""
        return self._store.sample()

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---- hold_allocation ---------------------------------------------------------------------------


class _StopRequested(Exception):
    """Raised by the SIGTERM/SIGINT handler of hold_allocation()."""


def hold_allocation(
    state_file: Path,
    gpu: int,
    mb: int,
    *,
    ramp_s: float = 0.0,
    hold_s: float | None = None,
    name: str = "alloc",
    utilization_percent: int = 0,
    strict: bool = False,
) -> None:
    """Hold ``mb`` MiB on ``gpu`` as this process: ramp up over ``ramp_s`` in steps of
    RAMP_STEP_S, hold for ``hold_s`` seconds (None: until SIGTERM or SIGINT), then release.
    The memory is released on every way out; a signal ends the hold and returns normally."""
    if mb < 0:
        raise ValueError(f"mb must be 0 or more, not {mb}")
    # The handler raises only while we sleep, so a signal can never cut a store update
    # (or the final release) in half; one that lands elsewhere is seen before the next sleep.
    stopping = sleeping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if sleeping:
            raise _StopRequested

    def pause(seconds: float) -> None:
        nonlocal sleeping
        sleeping = True
        try:
            if stopping:
                raise _StopRequested
            time.sleep(seconds)
        finally:
            sleeping = False

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        with SimGpuClient(state_file, strict=strict) as client:
            try:
                started = time.monotonic()
                while True:
                    fraction = 1.0 if ramp_s <= 0 else (time.monotonic() - started) / ramp_s
                    client.set_usage(
                        gpu,
                        round(mb * min(1.0, fraction)),
                        utilization_percent=utilization_percent,
                        name=name,
                    )
                    if fraction >= 1.0:
                        break
                    pause(min(RAMP_STEP_S, max(0.0, started + ramp_s - time.monotonic())))
                if hold_s is None:
                    while True:
                        pause(3600)
                pause(hold_s)
            except _StopRequested:
                pass
            finally:
                client.release(gpu=gpu)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

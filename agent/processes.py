"""Facts about local processes, this module the one reader of them: mostly through
psutil (whether a pid is still the process it was, who belongs to a process group or
session, a name), and from ``/proc/<pid>/fd`` the sockets a process holds, which psutil
ties to processes only together with the kernel's whole connection table.

A process is known by its pid and its start time. psutil gives the start time as the
ticks since boot plus the boot time; the boot time the kernel reports may move by up
to a second when the clock is stepped, so two readings of one process are compared
with that much slack. A pid handed to another process would need the pid space to wrap
within that second to be mistaken for its predecessor.

Blocking (each call reads ``/proc``): call these off the event loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

# How far two readings of one process's start time may differ (see above).
START_TIME_SLACK_S = 1.5
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None when it is gone or a zombie (which
    holds no memory and runs no code: for us it has exited)."""
    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() in _GONE:
            return None
        started: float = process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return started


def is_running(pid: int, started: float | None) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``started``
    (any live process when ``started`` is None)."""
    now = start_time(pid)
    if now is None:
        return False
    return started is None or same_start(now, started)


def same_start(a: float, b: float) -> bool:
    return abs(a - b) <= START_TIME_SLACK_S


def members(leader: int) -> frozenset[int]:
    """Live pids in the process group or the session that ``leader`` started."""
    found = set()
    for pid in psutil.pids():
        try:
            if leader not in (os.getpgid(pid), os.getsid(pid)):
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if start_time(pid) is not None:
            found.add(pid)
    return frozenset(found)


def name(pid: int) -> str | None:
    """The process's name (``comm``), None when it is gone."""
    try:
        found: str = psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return found or None


def resident_mb(pids: frozenset[int]) -> int:
    """Host memory the processes hold (their resident set, summed), in MiB."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total // (1024 * 1024)


def host_memory_mb() -> int:
    """This machine's memory, in MiB."""
    return int(psutil.virtual_memory().total // (1024 * 1024))


def pids() -> list[int]:
    """Every process's pid, as the system lists them now."""
    listed: list[int] = psutil.pids()
    return listed


def socket_inodes(pid: int) -> frozenset[int]:
    """The inodes of the sockets ``pid`` holds open (its descriptors' links read
    ``socket:[inode]``); empty when it is gone or not ours to read."""
    fd_dir = f"/proc/{pid}/fd"
    found: set[int] = set()
    try:
        descriptors = os.listdir(fd_dir)
    except OSError:
        return frozenset()
    for descriptor in descriptors:
        try:
            target = os.readlink(f"{fd_dir}/{descriptor}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return frozenset(found)


def boot_id() -> str | None:
    """This boot's id: a pid recorded before a reboot is not the same process."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def age_s(pid: int) -> float | None:
    """How long ago ``pid`` started, to the clock tick. Its start time is psutil's boot
    time (whole seconds) plus the ticks since boot: the ticks are exact, the sum is not."""
    started = start_time(pid)
    if started is None:
        return None
    since_boot = started - psutil.boot_time()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot


def ticks_to_start_time(ticks: int) -> float:
    """A start time recorded as clock ticks since boot (``/proc/<pid>/stat`` field 22,
    as pid files of earlier versions did) in epoch seconds, as psutil counts it."""
    return float(psutil.boot_time() + ticks / os.sysconf("SC_CLK_TCK"))

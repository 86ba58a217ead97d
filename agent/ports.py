"""Who listens on a TCP port of this machine, from /proc (Linux): before a model server
is started on its port, and to tell whether what answers its health check is the
server just started or somebody else's.

Blocking (it reads /proc): call it off the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class Listener:
    """The processes listening on a port; ``pids`` is empty when they cannot be seen
    (another user's processes, another network namespace's)."""

    port: int
    pids: frozenset[int]

    def describe(self) -> str:
        if not self.pids:
            return "a process this agent cannot see"
        return ", ".join(f"pid {pid} ({_command(pid)})" for pid in sorted(self.pids))


def listener(port: int, proc: Path = PROC) -> Listener | None:
    """Who listens on ``port`` (any address), None when nobody does, or when /proc
    cannot tell (then callers go on as if it were free)."""
    inodes = _listening_inodes(port, proc)
    if inodes is None or not inodes:
        return None
    return Listener(port, frozenset(_pids_with_sockets(inodes, proc)))


def _listening_inodes(port: int, proc: Path) -> set[str] | None:
    found: set[str] = set()
    readable = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                found.add(fields[9])
    return found if readable else None


def _pids_with_sockets(inodes: set[str], proc: Path) -> set[int]:
    targets = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = os.listdir(entry / "fd")
        except OSError:  # gone, or not ours to read
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(entry / "fd" / descriptor) in targets:
                    pids.add(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def _command(pid: int, proc: Path = PROC) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"

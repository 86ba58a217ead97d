"""Who listens on a TCP port of this machine (psutil): before a model server is started
on its port, and to tell whether what answers its health check is the server just
started or somebody else's.

Blocking (it reads /proc): call it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from agent import processes


@dataclass(frozen=True, slots=True)
class Listener:
    """The processes listening on a port; ``pids`` is empty when they cannot be seen
    (another user's processes, another network namespace's)."""

    port: int
    pids: frozenset[int]

    def describe(self) -> str:
        if not self.pids:
            return "a process this agent cannot see"
        return ", ".join(f"pid {pid} ({processes.name(pid) or '?'})" for pid in sorted(self.pids))


def listener(port: int) -> Listener | None:
    """Who listens on ``port`` (any address), None when nobody does, or when the system
    cannot tell (then callers go on as if it were free)."""
    try:
        sockets = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    listening = [
        s for s in sockets if s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port
    ]
    if not listening:
        return None
    return Listener(port, frozenset(s.pid for s in listening if s.pid is not None))

"""Who listens on a TCP port of this machine: before a model server is started on its
port, and to tell whether what answers its health check is the server just started or
somebody else's.

Both questions sit on a switch's path, so each is answered as cheaply as it can be.
The listening sockets come from the kernel's socket diagnostics over netlink (what
``ss`` asks; 0.04 ms), not from /proc/net/tcp, which the kernel builds by walking its
whole connection table (4 ms a read here, more on a host with much memory); the tables
are the fallback where netlink is refused. A socket is tied to a process through the
process's descriptors: the server's own are read first, everyone's only to name
somebody else (psutil.net_connections reads both tables and every process's
descriptors: 15 ms a call, twice a switch, when it was asked first).

Blocking (it reads /proc): call it off the event loop.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent import processes

# The kernel's TCP socket tables of this network namespace (IPv4, IPv6): the fallback.
SOCKET_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = 10

# linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, id
_SPORT_AT, _INODE_AT = 4, 68
# The kernel answers at once; a wait this long means it will not.
_ANSWER_WITHIN_S = 1.0  # in inet_diag_msg: id.idiag_sport (big-endian), idiag_inode


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


def listener(port: int, tables: Iterable[Path] = SOCKET_TABLES) -> Listener | None:
    """Who listens on ``port`` (any address), None when nobody does, or when the system
    cannot tell (then callers go on as if it were free)."""
    inodes = listening_sockets(port, tables)
    if not inodes:
        return None
    holders = [pid for pid in processes.pids() if processes.socket_inodes(pid) & inodes]
    return Listener(port, frozenset(holders))


def listens(pids: Iterable[int], port: int, tables: Iterable[Path] = SOCKET_TABLES) -> bool:
    """Whether one of ``pids`` listens on ``port``; reads only their descriptors."""
    inodes = listening_sockets(port, tables)
    if not inodes:
        return False
    return any(processes.socket_inodes(pid) & inodes for pid in pids)


def listening_sockets(port: int, tables: Iterable[Path] = SOCKET_TABLES) -> frozenset[int] | None:
    """The inodes of the sockets listening on ``port`` (IPv4 and IPv6); None when the
    system cannot tell."""
    try:
        return _from_netlink(port)
    except OSError:  # netlink refused (a sandbox, an old kernel): read the tables
        return _from_tables(port, tables)


def _from_netlink(port: int) -> frozenset[int]:
    found: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(_ANSWER_WITHIN_S)
        for family in (socket.AF_INET, socket.AF_INET6):
            request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
            header = _HEADER.pack(
                _HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, family, 0
            )
            diag.send(header + request)
            found.update(inode for sport, inode in _dump(diag) if sport == port)
    return frozenset(found)


def _dump(diag: socket.socket) -> list[tuple[int, int]]:
    """(port, inode) of each socket of one dump's answer. A dump the kernel could not make
    (``tcp_diag`` not loaded: a negative errno in its last message), a malformed or cut
    answer and no answer in time are an OSError: the caller reads the tables instead."""
    found: list[tuple[int, int]] = []
    try:
        while True:
            data = diag.recv(65536)
            if not data:
                raise OSError("socket diagnostics closed before the dump ended")
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind = _HEADER.unpack_from(data, offset)[:2]
                if length < _HEADER.size:
                    raise OSError(f"a malformed socket diagnostics message ({length} bytes)")
                body = offset + _HEADER.size
                if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    (status,) = struct.unpack_from("=i", data, body)
                    if status < 0:
                        raise OSError(-status, "socket diagnostics refused")
                    if kind == _NLMSG_DONE:
                        return found
                else:
                    (sport,) = struct.unpack_from("!H", data, body + _SPORT_AT)
                    (inode,) = struct.unpack_from("=I", data, body + _INODE_AT)
                    found.append((sport, inode))
                offset += (length + 3) & ~3
    except struct.error as exc:
        raise OSError(f"a cut socket diagnostics message: {exc}") from None


def _from_tables(port: int, tables: Iterable[Path]) -> frozenset[int] | None:
    found: set[int] = set()
    readable = False
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = row.split()
            if len(fields) < 10 or int(fields[3], 16) != _TCP_LISTEN:
                continue
            if int(fields[1].rpartition(":")[2], 16) == port:
                found.add(int(fields[9]))
    return frozenset(found) if readable else None

"""Who listens on a port: the kernel's socket diagnostics say whether anyone does (the
connection tables where netlink is refused), processes are read only when someone
does, and the server's own before everyone's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import ports, processes


@pytest.fixture
def listening() -> Iterator[int]:
    """A port this test process listens on (IPv4)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(params=["netlink", "tables"])
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with netlink's answer and with the tables' (netlink refused)."""
    if request.param == "tables":

        def refused(port: int) -> frozenset[int]:
            raise PermissionError(13, "netlink refused")

        monkeypatch.setattr(ports, "_from_netlink", refused)
    return str(request.param)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # bound, never listening; closed on return


def test_the_listener_on_a_port_is_named_by_pid(source: str, listening: int) -> None:
    holder = ports.listener(listening)
    assert holder is not None and holder.pids == {os.getpid()}
    assert f"pid {os.getpid()} (" in holder.describe()


def test_a_listening_socket_is_found_by_its_inode(source: str, listening: int) -> None:
    inodes = ports.listening_sockets(listening)
    assert inodes and inodes <= processes.socket_inodes(os.getpid())


def test_an_ipv6_listener_is_found_too(source: str) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        sock.listen()
        holder = ports.listener(sock.getsockname()[1])
        assert holder is not None and holder.pids == {os.getpid()}


def test_a_port_nobody_listens_on_reads_no_process(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case before every start: answered without reading any descriptors."""

    def descriptors(pid: int) -> frozenset[int]:
        raise AssertionError(f"read pid {pid}'s descriptors for a free port")

    monkeypatch.setattr(processes, "socket_inodes", descriptors)
    port = closed_port()
    assert ports.listening_sockets(port) == frozenset()
    assert ports.listener(port) is None
    assert not ports.listens({os.getpid()}, port)


def test_a_system_that_cannot_tell_is_taken_as_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    def refused(port: int) -> frozenset[int]:
        raise PermissionError(13, "netlink refused")

    monkeypatch.setattr(ports, "_from_netlink", refused)
    missing = [tmp_path / "tcp", tmp_path / "tcp6"]
    assert ports.listening_sockets(listening, missing) is None
    assert ports.listener(listening, missing) is None


def test_listens_reads_only_the_given_processes(source: str, listening: int) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert ports.listens({os.getpid()}, listening)
        assert not ports.listens({other.pid}, listening)
        assert not ports.listens({other.pid, os.getpid()}, closed_port())
    finally:
        other.kill()
        other.wait()
    # A pid that is gone is no listener, not an error.
    assert not ports.listens({other.pid}, listening)
    assert processes.socket_inodes(other.pid) == frozenset()


class FakeDiag:
    """The netlink socket's side of a dump: these answers, then nothing."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0) if self.answers else b""


def message(kind: int, body: bytes, length: int | None = None) -> bytes:
    size = ports._HEADER.size + len(body)
    return ports._HEADER.pack(size if length is None else length, kind, 2, 0, 0) + body


def socket_message(port: int, inode: int) -> bytes:
    body = bytearray(72)
    body[ports._SPORT_AT : ports._SPORT_AT + 2] = port.to_bytes(2, "big")
    body[ports._INODE_AT : ports._INODE_AT + 4] = inode.to_bytes(4, sys.byteorder)
    return message(20, bytes(body))


def done(status: int = 0) -> bytes:
    return message(ports._NLMSG_DONE, status.to_bytes(4, sys.byteorder, signed=True))


def test_a_dump_lists_each_sockets_port_and_inode() -> None:
    answer = socket_message(8080, 41) + socket_message(9470, 42)
    assert ports._dump(FakeDiag(answer, done())) == [(8080, 41), (9470, 42)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "answers",
    [
        # The kernel could not make the dump (tcp_diag missing): -ENOENT in its last message.
        (socket_message(8080, 41), done(-2)),
        (message(ports._NLMSG_ERROR, (-13).to_bytes(4, sys.byteorder, signed=True)),),
        (message(20, b"", length=4),),  # a length shorter than its header
        (socket_message(8080, 41)[:30],),  # cut short
        (socket_message(8080, 41),),  # the socket closed before the dump ended
    ],
)
def test_a_dump_that_cannot_be_read_is_an_oserror(answers: tuple[bytes, ...]) -> None:
    """So that the tables are read instead: a refusal must never read as 'nobody listens'."""
    with pytest.raises(OSError):
        ports._dump(FakeDiag(*answers))  # type: ignore[arg-type]

"""Start a private Mosquitto for the demo and the tests.

The broker runs as a child process on free loopback ports with a rendered
config; ``start()`` returns once the ports accept connections (no sleeps).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

# Loopback-only, anonymous: the demo broker is for this machine's user alone.
DEMO_CONFIG = """\
per_listener_settings true
listener @PORT@ 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_packet_size 262144
persistence false
log_dest stderr
"""


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


class ChildBroker:
    """What every broker modelbus runs as a child process shares: a port on the
    loopback, a working directory, a log file, and a stop that leaves nothing behind."""

    log_name = "broker.log"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="modelbus-broker-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / self.log_name

    def start(self, timeout_s: float = 10.0) -> None:
        raise NotImplementedError

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
            return " | ".join(tail) or "(empty log)"
        return "(no log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()


class MosquittoBroker(ChildBroker):
    """One mosquitto process. ``template`` holds ``@PORT@``, optionally ``@AUTH_PORT@``
    and ``@DIR@`` (a directory the broker can read, for password and ACL files)."""

    log_name = "mosquitto.log"

    def __init__(
        self,
        template: str,
        *,
        files: Mapping[str, str | bytes] | None = None,
        port: int | None = None,
        auth_port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(port=port, workdir=workdir)
        self.template = template
        self.files = dict(files or {})
        self.auth_port = auth_port or (free_port() if "@AUTH_PORT@" in template else None)

    def _prepare(self) -> Path:
        # mosquitto started as root drops to user 'mosquitto': it must be able to
        # read everything here, including the directory itself.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        for name, content in self.files.items():
            path = self.workdir / name
            data = content.encode() if isinstance(content, str) else content
            path.write_bytes(data)
            path.chmod(0o644)
            _give_to_mosquitto(path)
        rendered = (
            self.template.replace("@PORT@", str(self.port))
            .replace("@AUTH_PORT@", str(self.auth_port or ""))
            .replace("@DIR@", str(self.workdir))
        )
        config = self.workdir / "mosquitto.conf"
        config.write_text(rendered)
        config.chmod(0o644)
        return config

    def start(self, timeout_s: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError(
                "the mosquitto binary is not installed: "
                "apt-get install -y mosquitto mosquitto-clients"
            )
        config = self._prepare()
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [binary, "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        ports = [p for p in (self.port, self.auth_port) if p]
        deadline = time.monotonic() + timeout_s
        while not all(port_accepts(p) for p in ports):
            if self.process.poll() is not None:
                raise BrokerError(f"mosquitto exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not accept connections: {self.log_tail()}")
            time.sleep(0.01)


def _give_to_mosquitto(path: Path) -> None:
    """Password files should not be world-readable; hand them to the broker's user."""
    if os.geteuid() != 0:
        return
    import pwd

    with contextlib.suppress(KeyError, OSError):
        entry = pwd.getpwnam("mosquitto")
        os.chown(path, entry.pw_uid, entry.pw_gid)
        if path.name.startswith("passwd"):
            path.chmod(0o600)

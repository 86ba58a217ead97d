"""A private Docker daemon for the Docker runtime's tests.

It never touches the machine's own Docker: its data root, exec root, pid file,
config file and socket all live in one temporary directory, and it uses its own
containerd namespace. There is no bridge and no iptables (sandboxes rarely allow
either), so test containers use ``network_mode="host"``. No image can be pulled, so
``busybox_image()`` builds one with ``docker import`` from the host's static busybox.

``why_unavailable()`` says why the daemon cannot run here (the tests skip with it);
``PrivateDockerd.start()`` returns once the daemon answers a ping.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

BUSYBOX = Path("/bin/busybox")
BUSYBOX_IMAGE = "modelbus-test/busybox:1"
# Applets the test image links to busybox, so a command can say "httpd" or "sh".
APPLETS = ("sh", "httpd", "sleep", "echo", "cat", "env", "ps", "true", "false", "kill", "wget")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.05


class DockerdError(RuntimeError):
    pass


def dockerd_binary() -> str | None:
    return shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)), None
    )


def _is_static(path: Path) -> bool:
    """The image has no libc, so a dynamically linked busybox could not run in it."""
    try:
        result = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return True  # no ldd to ask: let the import and the first container tell
    return "=>" not in result.stdout


def why_unavailable() -> str | None:
    """Why a private dockerd cannot run here, or None when it can be tried."""
    if dockerd_binary() is None:
        return "dockerd is not installed (bash .ci/install-docker.sh installs docker.io)"
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        return "no static /bin/busybox (bash .ci/install-docker.sh installs busybox-static)"
    if os.geteuid() != 0:
        return "a private dockerd needs root: run the Docker tests as root"
    return None


def _mount_points_under(directory: Path) -> list[str]:
    """Mounts dockerd left under ``directory`` (its data root bind mount, netns, overlay
    layers after a crash), deepest first so each unmount leaves its parent free."""
    prefix = str(directory.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


class PrivateDockerd:
    """One ``dockerd`` child process with everything under ``workdir``."""

    def __init__(self, workdir: Path | None = None, storage_driver: str | None = None) -> None:
        self._own_workdir = workdir is None
        # Short on purpose: the socket path must fit in a sockaddr_un (108 bytes).
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="modelbus-dockerd-"))
        # None lets dockerd choose: overlay2 where the filesystem allows it, vfs otherwise.
        self.storage_driver = storage_driver or os.environ.get("MODELBUS_TEST_DOCKER_STORAGE")
        self.socket = self.workdir / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.base_url, timeout=30)
        return self._client

    def command(self, binary: str) -> list[str]:
        config = self.workdir / "daemon.json"
        config.write_text("{}")  # not the machine's /etc/docker/daemon.json
        argv = [
            binary,
            "--iptables=false",
            "--bridge=none",
            f"--data-root={self.workdir / 'data'}",
            f"--exec-root={self.workdir / 'exec'}",
            f"--pidfile={self.workdir / 'dockerd.pid'}",
            f"--host={self.base_url}",
            f"--config-file={config}",
            # If a system containerd runs, dockerd uses it: keep our objects apart.
            f"--containerd-namespace=modelbus-test-{os.getpid()}",
            f"--containerd-plugins-namespace=modelbus-test-plugins-{os.getpid()}",
            "--shutdown-timeout=2",
            "--log-level=warn",
        ]
        if self.storage_driver:
            argv.append(f"--storage-driver={self.storage_driver}")
        return argv

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        binary = dockerd_binary()
        if binary is None:
            raise DockerdError("dockerd is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(binary),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C meant for pytest must not kill it mid-test.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise DockerdError(f"dockerd exited with code {code}: {self.last_log_line()}")
            if self.socket.exists() and self._answers():
                return
            if time.monotonic() > deadline:
                raise DockerdError(
                    f"dockerd did not answer within {timeout_s:.0f}s: {self.last_log_line()}"
                )
            time.sleep(POLL_S)

    def _answers(self) -> bool:
        try:
            probe = docker.DockerClient(base_url=self.base_url, timeout=2)
        except docker.errors.DockerException:
            return False
        try:
            return bool(probe.ping())
        except (docker.errors.DockerException, OSError):
            return False
        finally:
            probe.close()

    def last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.client.info()
        return info

    def busybox_image(self, tag: str = BUSYBOX_IMAGE) -> str:
        """``tag``, imported from a rootfs of /bin/busybox, applet links and /www/health
        (what ``busybox httpd -h /www`` serves), unless the daemon has it already."""
        try:
            self.client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        repository, _, version = tag.rpartition(":")
        self.client.api.import_image_from_data(
            _busybox_rootfs(), repository=repository, tag=version
        )
        self.client.images.get(tag)  # raises if the import did not produce it
        return tag

    def remove_containers(self) -> None:
        for container in self.client.containers.list(all=True):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)

    def stop(self) -> None:
        """Remove every container, stop dockerd (and the containerd it started),
        unmount what it left and delete the directory. Safe to call twice."""
        if self._client is not None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                self.remove_containers()
            self._client.close()
            self._client = None
        if self.process is not None:
            self._terminate(self.process)
            self.process = None
        if self._own_workdir and self.workdir.exists():
            for point in _mount_points_under(self.workdir):
                subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
                return
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # Killed (or it died on its own): dockerd could not stop its containerd.
        containerd_pid = self.workdir / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(containerd_pid.read_text().strip()), signal.SIGKILL)

    def __enter__(self) -> PrivateDockerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _busybox_rootfs() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data) if data else None)

        for directory in ("bin", "www", "tmp", "etc"):
            add(directory, tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for applet in APPLETS:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("www/health", tarfile.REGTYPE, 0o644, b"ok\n")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/:/bin/sh\n")
    return buffer.getvalue()

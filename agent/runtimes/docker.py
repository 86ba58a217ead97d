"""Model servers in Docker containers, through the Docker SDK.

The only module that imports ``docker``, and only when a ``DockerRuntime`` is built,
so an agent without Docker models never needs a daemon. A model's ``docker:`` block
either names an existing container (started and stopped, never changed) or gives an
image, from which this runtime creates a container of its own:
``modelbus-<host_id>-<model>``, labelled so a restarted agent can adopt it.

The SDK blocks, so every call runs in a thread under a timeout; its errors become
``RuntimeFailure`` with one sentence for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from agent.catalog import DockerLaunch, ModelSpec
from agent.log_lines import LogCursor, LogRead
from agent.runtimes.base import ExitStatus, Instance, RuntimeFailure
from agent.runtimes.docker_logs import read_container_log

T = TypeVar("T")

LABEL_MODEL = "modelbus.model"
LABEL_HOST = "modelbus.host"
LABEL_MANAGED = "modelbus.managed"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# How long one SDK call (create, start, inspect...) may take before the daemon
# counts as hung; a stop gets its own grace period on top.
CALL_TIMEOUT_S = 30.0
EXPLANATION_CHARS = 300


def container_name(host_id: str, model: str) -> str:
    """The name of the container this runtime creates for ``model`` on ``host_id``."""
    return f"modelbus-{host_id}-{model}" if host_id else f"modelbus-{model}"


class DockerRuntime:
    """Starts, stops and adopts model containers on one Docker daemon."""

    name = "docker"
    listens_itself = False

    def __init__(
        self,
        base_url: str | None = None,
        host_id: str = "",
        *,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        try:
            import docker  # noqa: TID251
        except ImportError as error:  # pragma: no cover - docker is a dependency
            raise RuntimeFailure(
                "the docker Python package is missing: pip install 'docker>=7'"
            ) from error
        self._docker: Any = docker
        self.base_url = base_url
        self.host_id = host_id
        self.call_timeout_s = call_timeout_s
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def address(self) -> str:
        """Where the daemon is expected, for error messages."""
        return self.base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST

    # -- the Runtime protocol -------------------------------------------------

    async def start(self, spec: ModelSpec, extra_env: dict[str, str]) -> Instance:
        launch = _launch(spec)
        if launch.container is not None:
            return await self._run(
                f"start container '{launch.container}' for model '{spec.name}'",
                self._start_existing,
                spec,
                launch.container,
            )
        return await self._run(
            f"start image '{launch.image}' for model '{spec.name}'",
            self._create_and_start,
            spec,
            launch,
            extra_env,
        )

    async def stop(self, instance: Instance, timeout_s: float) -> None:
        await self._run(
            f"stop the container of model '{instance.model}'",
            self._stop,
            instance,
            timeout_s,
            timeout_s=timeout_s + self.call_timeout_s,
        )

    async def exit_status(self, instance: Instance) -> ExitStatus | None:
        return await self._run(
            f"inspect the container of model '{instance.model}'", self._exit_status, instance
        )

    async def logs(self, instance: Instance, lines: int = 20) -> list[str]:
        # For error reports: a daemon that fails or hangs costs the report its lines,
        # never the report (and never the event loop: two dockerd calls).
        if lines <= 0:
            return []
        try:
            output = await self._run(
                f"read the log of model '{instance.model}'", self._tail, instance, lines
            )
        except RuntimeFailure:
            return []
        return output.decode(errors="replace").splitlines()[-lines:]

    async def read_log(
        self, spec: ModelSpec, since: LogCursor | None, lines: int, *, live: bool
    ) -> LogRead:
        return await self._run(
            f"read the log of model '{spec.name}'", self._read_log, spec, since, lines
        )

    def _read_log(self, spec: ModelSpec, since: LogCursor | None, lines: int) -> LogRead:
        # By name: the container of a stopped model is found as long as it exists.
        name = _launch(spec).container or container_name(self.host_id, spec.name)
        try:
            container = self.client.containers.get(name)
        except self._docker.errors.NotFound:
            container = None
        return read_container_log(container, since, lines)

    def _tail(self, instance: Instance, lines: int) -> bytes:
        container = self._container(instance)
        if container is None:
            return b""
        output: bytes = container.logs(tail=lines)
        return output

    async def adopt(self, specs: dict[str, ModelSpec]) -> list[Instance]:
        return await self._run("list the running model containers", self._adopt, specs)

    async def pids(self, instance: Instance) -> frozenset[int]:
        return await self._run(
            f"list the processes of model '{instance.model}'", self._pids_of, instance
        )

    # -- blocking halves, run in a thread ----------------------------------------

    def _start_existing(self, spec: ModelSpec, name: str) -> Instance:
        try:
            container = self.client.containers.get(name)
        except self._docker.errors.NotFound:
            raise RuntimeFailure(
                f"container '{name}' for model '{spec.name}' does not exist: "
                "create it or use image:"
            ) from None
        if container.status not in ("running", "restarting"):
            container.start()
        container.reload()
        return self._instance(spec.name, container)

    def _create_and_start(
        self, spec: ModelSpec, launch: DockerLaunch, extra_env: dict[str, str]
    ) -> Instance:
        options = self.container_options(spec, extra_env)
        self._remove_previous(options["name"], spec)
        try:
            container = self.client.containers.create(launch.image, **options)
        except self._docker.errors.ImageNotFound:
            raise RuntimeFailure(
                f"image '{launch.image}' for model '{spec.name}' is not on this host: "
                f"docker pull {launch.image}"
            ) from None
        try:
            container.start()
            container.reload()
        except BaseException:
            # A created but unstartable container (no GPU runtime, port taken) would
            # only be in the way of the next attempt.
            with contextlib.suppress(self._docker.errors.DockerException):
                container.remove(force=True)
            raise
        return self._instance(spec.name, container)

    def container_options(self, spec: ModelSpec, extra_env: dict[str, str]) -> dict[str, Any]:
        """What ``containers.create`` is given for a model's image (its ``docker:`` block):
        name, labels, environment, volumes, command, ports, stop signal, GPU requests."""
        launch = _launch(spec)
        name = container_name(self.host_id, spec.name)
        gpus = ",".join(map(str, spec.gpus))
        environment = {key: spec.expand(value) for key, value in launch.env.items()}
        environment.update(extra_env)
        environment.update(
            MODELBUS_MODEL=spec.name,
            MODELBUS_PORT=str(spec.port),
            MODELBUS_GPUS=gpus,
            # The model's GPUs are what the planner accounts for, so no override.
            NVIDIA_VISIBLE_DEVICES=gpus,
        )
        options: dict[str, Any] = {
            "name": name,
            "labels": {
                LABEL_MODEL: spec.name,
                LABEL_HOST: self.host_id,
                LABEL_MANAGED: "true",
            },
            "environment": environment,
            "volumes": _binds(spec, launch.volumes),
            "detach": True,
        }
        if launch.command is not None:
            options["command"] = [spec.expand(argument) for argument in launch.command]
        if launch.network_mode is not None:
            options["network_mode"] = launch.network_mode
        if launch.network_mode != "host":
            published = launch.ports or {spec.port: spec.port}
            options["ports"] = {
                f"{inside}/tcp": outside if launch.bind is None else (launch.bind, outside)
                for inside, outside in published.items()
            }
        if spec.stop_signal != "SIGTERM":
            options["stop_signal"] = spec.stop_signal
        if launch.gpu_device_request:
            options["device_requests"] = [
                self._docker.types.DeviceRequest(
                    device_ids=[str(gpu) for gpu in spec.gpus], capabilities=[["gpu"]]
                )
            ]
        return options

    def _remove_previous(self, name: str, spec: ModelSpec) -> None:
        try:
            previous = self.client.containers.get(name)
        except self._docker.errors.NotFound:
            return
        labels: dict[str, str] = previous.labels or {}
        if labels.get(LABEL_MANAGED) != "true" or labels.get(LABEL_MODEL) != spec.name:
            raise RuntimeFailure(
                f"a container named '{name}' exists that modelbus did not create for "
                f"model '{spec.name}': rename or remove it"
            )
        # Ours, from an earlier run: usually exited; if it still runs the agent lost
        # track of it, and the catalog may have changed since, so it is replaced.
        if previous.status in ("running", "restarting", "paused"):
            previous.stop(timeout=math.ceil(spec.stop_timeout_s))
        with contextlib.suppress(self._docker.errors.NotFound):
            previous.remove(force=True)

    def _stop(self, instance: Instance, timeout_s: float) -> None:
        container = self._container(instance)
        if container is None:
            return
        try:
            if container.status in ("running", "restarting", "paused"):
                container.stop(timeout=math.ceil(timeout_s))
            if (container.labels or {}).get(LABEL_MANAGED) == "true":
                container.remove(force=True)
        except self._docker.errors.NotFound:
            return
        except self._docker.errors.APIError as error:
            if "already in progress" not in _explanation(error):
                raise

    def _exit_status(self, instance: Instance) -> ExitStatus | None:
        container = self._container(instance)
        if container is None:
            return ExitStatus(code=None, reason="container was removed")
        state: dict[str, Any] = container.attrs.get("State") or {}
        status = state.get("Status", container.status)
        if state.get("Running") or status in ("running", "restarting", "paused"):
            return None
        if status == "created":
            return ExitStatus(code=None, reason="container was created but never started")
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            return ExitStatus(code=code, reason=f"container ran out of memory (exit code {code})")
        if state.get("Error"):
            return ExitStatus(code=code, reason=f"container failed: {state['Error']}")
        return ExitStatus(code=code, reason=f"container exited with code {_describe(code)}")

    def _adopt(self, specs: dict[str, ModelSpec]) -> list[Instance]:
        found: dict[str, Instance] = {}
        ours = self.client.containers.list(
            filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_HOST}={self.host_id}"]},
            ignore_removed=True,
        )
        for container in ours:
            model = (container.labels or {}).get(LABEL_MODEL)
            spec = specs.get(model) if model else None
            if spec is not None and spec.runtime == "docker":
                found[container.id] = self._instance(spec.name, container)
        for spec in specs.values():
            if spec.docker is None or spec.docker.container is None:
                continue
            try:
                container = self.client.containers.get(spec.docker.container)
            except self._docker.errors.NotFound:
                continue
            if container.status == "running" and container.id not in found:
                found[container.id] = self._instance(spec.name, container)
        return list(found.values())

    def _pids_of(self, instance: Instance) -> frozenset[int]:
        container = self._container(instance)
        return frozenset() if container is None else self._top(container)

    def _top(self, container: Any) -> frozenset[int]:
        """Host pids of the container's processes (the daemon runs ``ps`` for us)."""
        try:
            table = container.top()
        except self._docker.errors.APIError:
            return frozenset()  # not running (or gone) between inspect and top
        titles: list[str] = table.get("Titles") or []
        if "PID" not in titles:
            return frozenset()
        column = titles.index("PID")
        return frozenset(
            int(row[column]) for row in table.get("Processes") or [] if row[column].isdigit()
        )

    def _instance(self, model: str, container: Any) -> Instance:
        state: dict[str, Any] = container.attrs.get("State") or {}
        pid = state.get("Pid") or None
        return Instance(
            model=model,
            runtime=self.name,
            pid=pid,
            container_id=container.id,
            container_name=container.name,
            started_at=_timestamp(state.get("StartedAt")) or time.time(),
            pids=self._top(container) if pid else frozenset(),
            stop_signal=(container.attrs.get("Config") or {}).get("StopSignal") or "SIGTERM",
        )

    def _container(self, instance: Instance) -> Any:
        """The instance's container, freshly inspected, or None when it is gone."""
        key = instance.container_id or instance.container_name
        if key is None:
            return None
        try:
            return self.client.containers.get(key)
        except self._docker.errors.NotFound:
            return None

    # -- the client and error translation -------------------------------------

    @property
    def client(self) -> Any:
        """The SDK client, connected on first use (version negotiation talks to the
        daemon), so building the runtime never needs Docker to be up."""
        with self._client_lock:
            if self._client is None:
                options = {"timeout": math.ceil(self.call_timeout_s)}
                self._client = (
                    self._docker.DockerClient(base_url=self.base_url, **options)
                    if self.base_url
                    else self._docker.from_env(**options)
                )
            return self._client

    async def _run(
        self,
        action: str,
        function: Callable[..., T],
        *args: Any,
        timeout_s: float | None = None,
    ) -> T:
        limit = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
            async with asyncio.timeout(limit):
                return await asyncio.to_thread(function, *args)
        except RuntimeFailure:
            raise
        except TimeoutError:
            raise RuntimeFailure(
                f"Docker at {self.address} did not answer within {limit:.0f}s "
                f"to {action}: is dockerd overloaded or hung?"
            ) from None
        except (self._docker.errors.DockerException, OSError) as error:
            raise RuntimeFailure(self._sentence(action, error)) from error

    def _sentence(self, action: str, error: BaseException) -> str:
        text = _explanation(error)
        if isinstance(error, self._docker.errors.APIError):
            if "could not select device driver" in text:
                return (
                    f"Docker could not {action} with its GPUs ({text}): install the NVIDIA "
                    "container toolkit or set gpu_device_request: false"
                )
            return f"Docker could not {action}: {text}"
        if "Permission denied" in text:
            return (
                f"Docker at {self.address} refused this user: "
                "add it to the 'docker' group or run the agent as root"
            )
        if "Timeout" in type(error).__name__ or "timed out" in text:
            return (
                f"Docker at {self.address} did not answer in time to {action}: "
                "is dockerd overloaded or hung?"
            )
        # requests' errors are OSErrors; the SDK wraps the first one (negotiating the
        # API version while connecting) in a plain DockerException.
        if isinstance(error, OSError) or "Error while fetching server API version" in text:
            return f"Docker is not reachable at {self.address}: is dockerd running?"
        return f"Docker at {self.address} could not {action}: {text}"


def _launch(spec: ModelSpec) -> DockerLaunch:
    if spec.docker is None:
        raise RuntimeFailure(f"model '{spec.name}' has no docker: block for the docker runtime")
    return spec.docker


def _binds(spec: ModelSpec, volumes: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"/host": "/inside:ro"}`` as the SDK wants it: ``{"/host": {"bind", "mode"}}``."""
    binds = {}
    for host_path, target in volumes.items():
        inside, _, mode = spec.expand(target).partition(":")
        binds[spec.expand(host_path)] = {"bind": inside, "mode": mode or "rw"}
    return binds


def _explanation(error: BaseException) -> str:
    """The daemon's own words when it gave any, else the exception text, one line."""
    text = getattr(error, "explanation", None) or str(error) or type(error).__name__
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    line = " ".join(str(text).split())
    return line[:EXPLANATION_CHARS]


def _describe(code: Any) -> str:
    """``137 (SIGKILL)``: a code above 128 is how a container reports a fatal signal."""
    if isinstance(code, int) and 128 < code < 128 + signal.NSIG:
        try:
            return f"{code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return str(code)


def _timestamp(value: Any) -> float | None:
    """Docker's RFC 3339 start time (nanoseconds, 'Z'), None for its zero time."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None

"""The Docker runtime against a real, private dockerd (tests/support/dockerd.py).

Test containers run a static busybox on the host network (the sandbox has no
bridge): ``busybox httpd`` stands in for a model server and answers /health.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest

from agent.catalog import ModelSpec
from agent.config import load_config
from agent.log_lines import BadCursor, LogCursor, LogRead
from agent.runtimes.base import ExitStatus, Instance, RuntimeFailure
from agent.runtimes.docker import DockerRuntime, container_name
from devtools.brokers import free_port
from tests.support.dockerd import DockerdError, PrivateDockerd, why_unavailable

T = TypeVar("T")
_hosts = itertools.count()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[PrivateDockerd]:
    """One private daemon for the session, with the busybox test image built."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    daemon = PrivateDockerd()
    try:
        daemon.start()
        daemon.busybox_image()
    except (DockerdError, docker.errors.DockerException) as error:
        daemon.stop()
        pytest.skip(f"dockerd cannot run in this sandbox: {error}")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def client(dockerd: PrivateDockerd) -> Iterator[Any]:
    """The daemon's SDK client; every test leaves the daemon without containers."""
    yield dockerd.client
    dockerd.remove_containers()


@pytest.fixture
def host_id() -> str:
    return f"h{next(_hosts)}"


@pytest.fixture
def runtime(dockerd: PrivateDockerd, client: Any, host_id: str) -> DockerRuntime:
    return DockerRuntime(base_url=dockerd.base_url, host_id=host_id)


def serve(port: str = "${PORT}", www: str = "/www") -> list[str]:
    """A model server stand-in: httpd under a shell that exits cleanly on SIGTERM
    (a bare httpd as PID 1 would ignore it and cost the whole stop timeout)."""
    return ["sh", "-c", f"trap 'echo stopping; exit 0' TERM; httpd -f -v -p {port} -h {www} & wait"]


def image_spec(name: str, **docker_block: Any) -> ModelSpec:
    block: dict[str, Any] = {
        "image": "modelbus-test/busybox:1",
        "command": serve(),
        "network_mode": "host",
        # No NVIDIA runtime here: a device request would fail the start.
        "gpu_device_request": False,
    }
    block.update(docker_block)
    return ModelSpec.model_validate(
        {
            "name": name,
            "runtime": "docker",
            "docker": block,
            "port": free_port(),
            "vram_mb": 1024,
            "stop_timeout_s": 5,
        }
    )


def container_spec(name: str, container: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "runtime": "docker",
            "docker": {"container": container},
            "port": free_port(),
            "vram_mb": 1024,
            "stop_timeout_s": 5,
        }
    )


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def health(spec: ModelSpec) -> str | None:
    """The body of GET /health, or None while nothing answers."""

    def get() -> str | None:
        try:
            with urllib.request.urlopen(spec.health, timeout=1) as response:
                return response.read().decode() if response.status == 200 else None
        except (urllib.error.URLError, ConnectionError):
            return None

    return await asyncio.to_thread(get)


def exists(client: Any, name: str) -> bool:
    try:
        client.containers.get(name)
        return True
    except docker.errors.NotFound:
        return False


async def test_image_mode_start_logs_stop(
    runtime: DockerRuntime, client: Any, host_id: str, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "health").write_text("from the volume\n")
    spec = image_spec(
        "busy-llm",
        volumes={str(www): "/srv/www:ro"},
        command=serve(www="/srv/www"),
        env={"GREETING": "${MODEL} on ${PORT}"},
    )

    instance = await runtime.start(spec, {"HF_TOKEN": "t0ken"})

    assert instance.model == "busy-llm" and instance.runtime == "docker"
    assert instance.container_name == container_name(host_id, "busy-llm")
    assert instance.container_name == f"modelbus-{host_id}-busy-llm"
    container = client.containers.get(instance.container_id)
    assert container.status == "running"
    assert container.labels == {
        "modelbus.model": "busy-llm",
        "modelbus.host": host_id,
        "modelbus.managed": "true",
    }
    env = set(container.attrs["Config"]["Env"])
    assert {
        f"GREETING=busy-llm on {spec.port}",
        "HF_TOKEN=t0ken",
        "MODELBUS_MODEL=busy-llm",
        f"MODELBUS_PORT={spec.port}",
        "MODELBUS_GPUS=0",
        "NVIDIA_VISIBLE_DEVICES=0",
    } <= env
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["Binds"] == [f"{www}:/srv/www:ro"]

    # Served from the read-only volume, on the port the ${PORT} macro put in the command.
    assert await eventually(lambda: health(spec), "GET /health") == "from the volume\n"
    assert await runtime.exit_status(instance) is None

    # The main pid is a host process, and the server (its child) is counted too.
    assert instance.pid is not None
    assert await asyncio.to_thread(Path(f"/proc/{instance.pid}").exists)
    pids = await runtime.pids(instance)
    assert instance.pid in pids and len(pids) >= 2
    assert instance.pid in instance.pids
    assert abs(instance.started_at - time.time()) < 30

    async def log_lines() -> list[str] | None:
        return await runtime.logs(instance, 5) or None

    log = await eventually(log_lines, "a log line")
    assert any("response:200" in line for line in log)
    assert len(await runtime.logs(instance, 1)) == 1

    started = time.monotonic()
    await runtime.stop(instance, timeout_s=5)
    assert time.monotonic() - started < 4, "SIGTERM should have stopped it, not SIGKILL"
    assert instance.container_name is not None
    assert not exists(client, instance.container_name)
    assert await runtime.exit_status(instance) == ExitStatus(None, "container was removed")
    assert await runtime.pids(instance) == frozenset()
    assert await runtime.logs(instance) == []
    await runtime.stop(instance, timeout_s=5)  # idempotent


# Says 300 numbered lines at once, then one a second; a TERM ends it within that second.
TALKER = (
    "trap 'exit 0' TERM; i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line $i; done; "
    "while true; do i=$((i+1)); echo line $i; sleep 1; done"
)


def numbers(lines: tuple[str, ...]) -> list[int]:
    return [int(line.split()[1]) for line in lines]


async def test_read_log_follows_a_container_by_its_timestamps(
    runtime: DockerRuntime, client: Any
) -> None:
    talker = image_spec("talker", command=["sh", "-c", TALKER])
    never = await runtime.read_log(talker, None, 10, live=False)
    assert never.lines == () and not never.more
    instance = await runtime.start(talker, {})

    async def said(count: int) -> LogRead | None:
        read = await runtime.read_log(talker, None, count, live=True)
        return read if len(read.lines) == count and numbers(read.lines)[-1] >= 300 else None

    last = await eventually(lambda: said(5), "300 lines")
    assert numbers(last.lines) == list(range(numbers(last.lines)[0], numbers(last.lines)[0] + 5))
    # From the start, 70 at a time (timestamps a microsecond apart or less): each line once.
    cursor, seen, mores = LogCursor(last.cursor.run, "0-0"), [], []
    while len(seen) < 302:
        step = await runtime.read_log(talker, cursor, 70, live=True)
        assert len(step.lines) <= 70 and not step.restarted
        if step.lines:
            mores.append(step.more)
        else:
            await asyncio.sleep(0.1)
        seen += numbers(step.lines)
        cursor = step.cursor
    assert seen == list(range(1, len(seen) + 1))
    # Four full replies said more was there; then the lines came as they were said.
    assert mores[:4] == [True] * 4 and not any(mores[4:]), mores
    with pytest.raises(BadCursor):
        await runtime.read_log(talker, LogCursor(cursor.run, "123"), 10, live=True)

    # The runtime removes the container it made when it stops it: its log goes with it.
    await runtime.stop(instance, timeout_s=5)
    gone = await runtime.read_log(talker, cursor, 10, live=False)
    assert gone.lines == () and gone.cursor == cursor
    again = await runtime.start(talker, {})
    restarted = await eventually(
        lambda: _lines_from(runtime, talker, cursor), "the new container's first lines"
    )
    assert restarted.restarted and numbers(restarted.lines)[:3] == [1, 2, 3]
    assert restarted.cursor.run != cursor.run
    await runtime.stop(again, timeout_s=5)


async def _lines_from(runtime: DockerRuntime, spec: ModelSpec, cursor: LogCursor) -> LogRead | None:
    read = await runtime.read_log(spec, cursor, 10, live=True)
    return read if len(read.lines) >= 3 else None


async def test_existing_container_is_started_and_stopped_not_removed(
    runtime: DockerRuntime, client: Any
) -> None:
    spec = container_spec("their-server", "hand-made")
    client.containers.create(
        "modelbus-test/busybox:1",
        serve(port=str(spec.port)),
        name="hand-made",
        network_mode="host",
    )

    instance = await runtime.start(spec, {"IGNORED": "1"})

    assert instance.container_name == "hand-made"
    assert client.containers.get("hand-made").status == "running"
    assert await eventually(lambda: health(spec), "GET /health") == "ok\n"
    assert instance.pid is not None and instance.pid in instance.pids

    await runtime.stop(instance, timeout_s=5)
    stopped = client.containers.get("hand-made")
    assert stopped.status == "exited" and stopped.labels == {}
    assert await runtime.exit_status(instance) == ExitStatus(0, "container exited with code 0")

    # And it can be started again (the agent loads it a second time).
    again = await runtime.start(spec, {})
    assert again.container_id == instance.container_id
    assert await eventually(lambda: health(spec), "GET /health again") == "ok\n"
    await runtime.stop(again, timeout_s=5)
    assert exists(client, "hand-made")


async def test_exit_status_of_a_crashed_server_then_a_fresh_start(
    runtime: DockerRuntime, client: Any
) -> None:
    crashing = image_spec("crasher", command=["sh", "-c", "echo 'CUDA out of memory'; exit 3"])
    instance = await runtime.start(crashing, {})

    status = await eventually(lambda: runtime.exit_status(instance), "the exit")
    assert status == ExitStatus(3, "container exited with code 3")
    assert await runtime.logs(instance) == ["CUDA out of memory"]

    # The exited container of ours is replaced, not in the way of the next start.
    fixed = image_spec("crasher")
    second = await runtime.start(fixed, {})
    assert second.container_name == instance.container_name
    assert second.container_id != instance.container_id
    assert instance.container_id is not None
    assert not exists(client, instance.container_id)
    assert await eventually(lambda: health(fixed), "GET /health") == "ok\n"
    await runtime.stop(second, timeout_s=5)


async def test_a_new_runtime_adopts_running_containers_of_its_host(
    dockerd: PrivateDockerd, runtime: DockerRuntime, client: Any, host_id: str
) -> None:
    ours = image_spec("adoptee")
    other_host = image_spec("adoptee")  # same model, another agent on this daemon
    named = container_spec("named", "named-server")
    client.containers.run(
        "modelbus-test/busybox:1",
        serve(port=str(named.port)),
        name="named-server",
        network_mode="host",
        detach=True,
    )
    started = await runtime.start(ours, {})
    other = DockerRuntime(base_url=dockerd.base_url, host_id=f"{host_id}-other")
    await other.start(other_host, {})

    # The agent restarts: a new runtime with the same host id finds its container.
    restarted = DockerRuntime(base_url=dockerd.base_url, host_id=host_id)
    adopted = await restarted.adopt({"adoptee": ours, "named": named})

    by_model = {instance.model: instance for instance in adopted}
    assert sorted(by_model) == ["adoptee", "named"]
    assert by_model["adoptee"].container_id == started.container_id
    assert by_model["adoptee"].pid == started.pid
    assert started.pid in by_model["adoptee"].pids
    assert abs(by_model["adoptee"].started_at - started.started_at) < 1
    assert by_model["named"].container_name == "named-server"
    # Models no longer in the catalog are not adopted.
    assert await restarted.adopt({}) == []
    # Stopped containers are not adopted either.
    await restarted.stop(by_model["adoptee"], timeout_s=5)
    assert [i.model for i in await restarted.adopt({"adoptee": ours, "named": named})] == ["named"]


async def test_ports_are_published_unless_the_network_is_the_hosts(
    runtime: DockerRuntime, client: Any
) -> None:
    # Without a bridge here nothing is reachable through them: only the request is checked.
    default = image_spec("published", network_mode=None, command=["sleep", "60"])
    explicit = image_spec("mapped", network_mode=None, command=["sleep", "60"], ports={80: 18080})
    bindings = {}
    for spec in (default, explicit):
        instance = await runtime.start(spec, {})
        host_config = client.containers.get(instance.container_id).attrs["HostConfig"]
        bindings[spec.name] = {
            inside: [binding["HostPort"] for binding in outside]
            for inside, outside in host_config["PortBindings"].items()
        }
    assert bindings == {
        "published": {f"{default.port}/tcp": [str(default.port)]},
        "mapped": {"80/tcp": ["18080"]},
    }


async def test_a_preset_container_asks_for_its_gpus_stop_signal_and_loopback_port(
    runtime: DockerRuntime, client: Any, tmp_path: Path
) -> None:
    """What dockerd records for a vLLM preset's container: no GPU can start it here, so the
    container is created from the runtime's options and inspected; the start itself fails
    for want of the NVIDIA runtime and leaves nothing behind."""
    (tmp_path / "weights" / "qwen").mkdir(parents=True)
    entry = {"preset": "vllm", "runtime": "docker", "weights": "qwen", "vram_mb": 1024}
    entry.update(image="modelbus-test/busybox:1", gpus=[0, 1])
    overrides = {"models": {"qwen": entry}, "state_dir": str(tmp_path)}
    spec = load_config(None, environ={}, overrides=overrides).models["qwen"]
    options = runtime.container_options(spec, {})
    created = await asyncio.to_thread(
        client.containers.create, "modelbus-test/busybox:1", **options
    )
    attrs = client.containers.get(created.id).attrs
    host_config, config = attrs["HostConfig"], attrs["Config"]
    (request,) = host_config["DeviceRequests"]
    assert request["DeviceIDs"] == ["0", "1"] and request["Capabilities"] == [["gpu"]]
    assert config["StopSignal"] == "SIGINT"
    assert host_config["PortBindings"] == {
        f"{spec.port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]
    }
    assert host_config["Binds"] == [f"{tmp_path / 'weights'}:/models:ro"]
    assert {"VLLM_SERVER_DEV_MODE=1", "NVIDIA_VISIBLE_DEVICES=0,1"} <= set(config["Env"])
    assert config["Cmd"][:2] == ["--model", "/models/qwen"]
    assert "--enable-sleep-mode" in config["Cmd"]
    assert config["Labels"]["modelbus.model"] == "qwen"
    created.remove(force=True)

    with pytest.raises(RuntimeFailure, match="gpu_device_request: false"):
        await runtime.start(spec, {})
    assert not exists(client, options["name"])


async def test_missing_existing_container_is_a_clear_failure(runtime: DockerRuntime) -> None:
    with pytest.raises(RuntimeFailure) as failure:
        await runtime.start(container_spec("ghost", "no-such-container"), {})
    assert str(failure.value) == (
        "container 'no-such-container' for model 'ghost' does not exist: create it or use image:"
    )


async def test_missing_image_is_a_clear_failure(runtime: DockerRuntime) -> None:
    with pytest.raises(
        RuntimeFailure, match=r"image 'modelbus-test/absent:1' for model 'x' is not"
    ):
        await runtime.start(image_spec("x", image="modelbus-test/absent:1"), {})


async def test_gpu_request_without_nvidia_runtime_fails_and_cleans_up(
    runtime: DockerRuntime, client: Any, host_id: str
) -> None:
    spec = image_spec("wants-gpu", gpu_device_request=True)
    with pytest.raises(RuntimeFailure, match="gpu_device_request: false"):
        await runtime.start(spec, {})
    assert not exists(client, container_name(host_id, "wants-gpu"))


async def test_unreachable_daemon_is_a_clear_failure(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-dockerd.sock"
    runtime = DockerRuntime(base_url=url, host_id="lab")  # building it needs no daemon
    message = f"Docker is not reachable at {url}: is dockerd running?"
    with pytest.raises(RuntimeFailure) as failure:
        await runtime.start(image_spec("x"), {})
    assert str(failure.value) == message
    with pytest.raises(RuntimeFailure, match="is dockerd running"):
        await runtime.adopt({})
    instance = Instance(model="x", runtime="docker", container_name="modelbus-lab-x")
    with pytest.raises(RuntimeFailure, match="is dockerd running"):
        await runtime.exit_status(instance)
    assert await runtime.logs(instance) == []


async def test_the_agent_runs_adopts_and_watches_a_docker_model(
    dockerd: PrivateDockerd, client: Any, broker: Any, prefix: str, tmp_path: Path
) -> None:
    """End to end: a real agent process, commanded over the real broker, runs a model in
    a container of the private dockerd, adopts it after a restart and notices its death."""
    import json
    import signal

    from shared.topics import HostTopics
    from tests.support.agent_process import AgentProcess, write_agent_config
    from tests.support.bus import watch

    spec = image_spec("boxed").model_dump(mode="json", exclude={"name"})
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id="docker-host",
        prefix=prefix,
        models={"boxed": spec},
    )
    env = {"DOCKER_HOST": dockerd.base_url}
    topics = HostTopics(prefix, "docker-host")
    agents = [AgentProcess(config, env=env)]
    try:
        async with watch(broker.port, topics.everything_filter) as bus:

            async def ask(command: str, body: dict[str, Any]) -> dict[str, Any]:
                mark = len(bus.messages)
                await bus.connection.publish(
                    topics.command(command),
                    json.dumps(body),
                    qos=1,
                    response_topic=topics.reply("t"),
                )
                reply = await bus.wait_topic(topics.reply("t"), after=mark, timeout=30)
                return dict(json.loads(reply.payload))

            await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
            loaded = await ask("load", {"model": "boxed", "wait": True})
            assert loaded["status"] == "ok", loaded
            name = container_name("docker-host", "boxed")
            assert client.containers.get(name).status == "running"

            # The agent restarts; the container keeps running and is adopted.
            agents[0].process.send_signal(signal.SIGTERM)
            assert agents[0].process.wait(15) == 0
            mark = len(bus.messages)
            agents.append(AgentProcess(config, env=env))
            await bus.wait_topic(
                topics.model("boxed"), lambda v: v and v["state"] == "ready", after=mark
            )

            # The container dies behind the agent's back: crashed.
            client.containers.get(name).kill()
            crashed = await bus.wait_topic(
                topics.model("boxed"), lambda v: v and v["state"] == "crashed", after=mark
            )
            assert "container exited" in json.loads(crashed.payload)["error"]
    finally:
        for agent in agents:
            agent.terminate()
            agent.close()


async def test_the_agent_talks_to_dockerd_off_the_event_loop(
    dockerd: PrivateDockerd, broker: Any, prefix: str, tmp_path: Path
) -> None:
    """Every request the docker SDK sends while the agent loads, reports on, reads the
    log of and stops a container is sent from a worker thread, never the loop's: a hung
    dockerd then costs a command its answer, not the agent its keepalive and telemetry."""
    import json

    from shared.topics import HostTopics
    from tests.support.agent_process import AgentProcess, write_agent_config
    from tests.support.bus import watch
    from tests.support.host import Host

    spec = image_spec("boxed").model_dump(mode="json", exclude={"name"})
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id="docker-host",
        prefix=prefix,
        models={"boxed": spec},
    )
    record = tmp_path / "loop-calls.json"
    env = {"DOCKER_HOST": dockerd.base_url, "MODELBUS_TEST_LOOP_CALLS": str(record)}
    topics = HostTopics(prefix, "docker-host")
    agent = AgentProcess(config, module="tests.support.loop_watch_agent", env=env)
    try:
        async with watch(broker.port, topics.everything_filter) as bus:
            host = Host(bus, topics, prefix)
            await host.online()
            for command, payload in [
                ("load", {"model": "boxed", "wait": True}),
                ("status", {}),
                ("logs", {"model": "boxed"}),
                ("unload", {"model": "boxed", "wait": True}),
            ]:
                reply = await host.ask(command, payload)
                assert reply.status == "ok", reply
        assert agent.terminate() == 0, agent.output()
    finally:
        agent.close()
    seen = json.loads(record.read_text())
    assert seen["calls"].get("docker", 0) > 0, seen
    assert seen["on_loop"] == []


async def test_a_docker_model_whose_port_is_taken_fails_port_in_use_before_starting(
    dockerd: PrivateDockerd, client: Any, broker: Any, prefix: str, tmp_path: Path
) -> None:
    """A stale server on the port would answer the container's health check: the load
    fails at once, naming the port and the process, and no container is created."""
    from shared.topics import HostTopics
    from tests.support.agent_process import AgentProcess, write_agent_config
    from tests.support.bus import watch
    from tests.support.host import Host
    from tests.support.models import stale_server

    spec = image_spec("boxed")
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id="docker-host",
        prefix=prefix,
        models={"boxed": spec.model_dump(mode="json", exclude={"name"})},
    )
    topics = HostTopics(prefix, "docker-host")
    agent = AgentProcess(config, env={"DOCKER_HOST": dockerd.base_url})
    try:
        with stale_server(spec.port) as stale:
            async with watch(broker.port, topics.everything_filter) as bus:
                host = Host(bus, topics, prefix)
                await host.online()
                reply = await host.ask("load", {"model": "boxed", "wait": True})
        assert reply.status == "error" and reply.error is not None, reply
        assert reply.error.code == "port_in_use"
        assert f"port {spec.port}" in reply.error.message
        assert f"pid {stale.pid}" in reply.error.message
        assert not exists(client, container_name("docker-host", "boxed"))
    finally:
        agent.terminate()
        agent.close()

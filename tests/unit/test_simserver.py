"""The simulated model server, run as a real process against a real simulator store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from devtools.gpu_sim import SimBackend, SimGpuSpec
from devtools.sim_sleep import SleepApi, SleepOptions
from devtools.simserver import (
    CRASH_EXIT_CODE,
    ENV_GPUS,
    ENV_LOAD_S,
    ENV_MODEL,
    ENV_PORT,
    ENV_SLEEP_API,
    ENV_SLEEP_RAM_MB,
    ENV_SLEEP_S,
    ENV_SLEEP_VRAM_MB,
    ENV_STATE,
    ENV_WAKE_S,
    HANG_FRACTION,
    SimServerOptions,
    parse_options,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASE_DELAY_S = 0.1
DEADLINE_S = 10.0
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def request(port: int, path: str, body: object | None = None) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body), or None while nothing answers on the port."""
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    if data is not None:
        call.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(call, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, logs: Path) -> None:
        self.proc = proc
        self.port = port
        self.logs = logs

    @property
    def stdout(self) -> str:
        return (self.logs / "stdout").read_text()

    @property
    def stderr(self) -> str:
        return (self.logs / "stderr").read_text()

    def health(self) -> tuple[int, dict[str, Any]] | None:
        return request(self.port, "/health")

    def wait_health(self, status: int) -> dict[str, Any]:
        def answered() -> dict[str, Any] | None:
            self.check_running()
            reply = self.health()
            return reply[1] if reply is not None and reply[0] == status else None

        return wait_for(answered, f"/health to answer {status}")

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the server exited with {self.proc.returncode}: {self.stderr}")

    def wait_exit(self) -> int:
        return self.proc.wait(DEADLINE_S)


class Servers:
    """Server processes of one test; whatever still runs at the end is killed."""

    def __init__(self, state: Path, workdir: Path) -> None:
        self.state = state
        self.workdir = workdir
        self.started: list[Server] = []

    def start(
        self,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        flags: bool = True,
    ) -> Server:
        port = free_port() if port is None else port
        argv = [sys.executable, "-m", "devtools.simserver"]
        if flags:
            argv += ["--port", str(port), "--state", str(self.state)]
        argv += args  # after the defaults, so a test's own --state wins
        base = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}
        logs = self.workdir / f"server{len(self.started)}"
        logs.mkdir()
        with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env={**base, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        server = Server(proc, port, logs)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            if server.proc.poll() is None:
                server.proc.kill()
            server.proc.wait(DEADLINE_S)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "gpus.bin"


@pytest.fixture
def backend(state: Path) -> Iterator[SimBackend]:
    specs = [SimGpuSpec(memory_total_mb=32768), SimGpuSpec(memory_total_mb=32768)]
    with SimBackend(state, specs, release_delay_s=RELEASE_DELAY_S) as opened:
        yield opened


@pytest.fixture
def servers(backend: SimBackend, state: Path, tmp_path: Path) -> Iterator[Servers]:
    group = Servers(state, tmp_path)
    yield group
    group.close()


def used(backend: SimBackend, gpu: int = 0) -> int:
    value = backend.sample()[gpu].memory_used_mb
    assert value is not None
    return value


def holders(backend: SimBackend, gpu: int = 0) -> dict[int, tuple[int | None, str | None]]:
    return {p.pid: (p.used_mb, p.name) for p in backend.sample()[gpu].processes}


def wait_freed(backend: SimBackend) -> None:
    wait_for(lambda: used(backend, 0) == used(backend, 1) == 0, "the memory to come back")


# ---- processes -------------------------------------------------------------------------------


def test_answers_loading_then_ready_and_holds_its_vram(
    servers: Servers, backend: SimBackend
) -> None:
    server = servers.start("--model", "m-ready", "--vram-mb", "4096", "--load-s", "1.0")

    loading = server.wait_health(503)
    assert loading["status"] == "loading"
    assert 0 <= loading["progress"] < 1
    assert server.wait_health(200) == {"status": "ok"}

    assert used(backend, 0) == 4096
    assert used(backend, 1) == 0
    assert holders(backend, 0) == {server.proc.pid: (4096, "m-ready")}
    wait_for(lambda: "ready" in server.stdout, "the ready line")
    assert f"port {server.port}" in server.stdout or f":{server.port}" in server.stdout


def test_memory_ramps_up_while_loading(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--vram-mb", "2000", "--load-s", "1.0")
    seen: list[int] = []
    progress: list[float] = []

    def ready() -> bool:
        server.check_running()
        seen.append(used(backend))
        reply = server.health()
        if reply is not None and reply[0] == 503:
            progress.append(reply[1]["progress"])
        return reply is not None and reply[0] == 200

    wait_for(ready, "the server to finish loading")

    assert any(0 < mb < 2000 for mb in seen), seen
    assert seen == sorted(seen), "the memory only grows while loading"
    assert progress == sorted(progress)
    assert any(0 < p < 1 for p in progress), progress
    assert used(backend) == 2000


def test_splits_the_memory_across_its_gpus(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--model", "m-split", "--gpus", "0,1", "--vram-mb", "1001")
    server.wait_health(200)

    assert (used(backend, 0), used(backend, 1)) == (501, 500)
    assert holders(backend, 0) == {server.proc.pid: (501, "m-split")}
    assert holders(backend, 1) == {server.proc.pid: (500, "m-split")}


def test_serves_models_and_chat_completions(servers: Servers) -> None:
    server = servers.start("--model", "m-chat", "--vram-mb", "100")
    server.wait_health(200)

    models = request(server.port, "/v1/models")
    assert models is not None and models[0] == 200
    assert models[1]["object"] == "list"
    assert [entry["id"] for entry in models[1]["data"]] == ["m-chat"]
    reply = request(
        server.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert reply is not None
    status, answer = reply
    assert status == 200
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "m-chat"
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Simulated answer from m-chat.",
    }
    assert answer["choices"][0]["finish_reason"] == "stop"

    bad = request(server.port, "/v1/chat/completions", {"prompt": "no messages"})
    assert bad is not None and bad[0] == 400
    missing = request(server.port, "/v1/nothing-here")
    assert missing is not None and missing[0] == 404
    posted_to_health = request(server.port, "/health", {"x": 1})
    assert posted_to_health is not None and posted_to_health[0] == 404


def test_sigterm_releases_the_memory_and_exits_0(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--gpus", "0,1", "--vram-mb", "3000")
    server.wait_health(200)
    assert used(backend, 0) == used(backend, 1) == 1500

    server.proc.send_signal(signal.SIGTERM)

    assert server.wait_exit() == 0
    assert server.stdout.splitlines()[-1] == "stopping"
    # Released memory is no longer listed at once, and comes back after the release delay.
    assert server.proc.pid not in holders(backend, 0)
    wait_freed(backend)


def test_sigint_while_loading_releases_the_partial_memory(
    servers: Servers, backend: SimBackend
) -> None:
    server = servers.start("--vram-mb", "1000", "--hang", "--load-s", "0.2")
    wait_for(lambda: used(backend) > 0, "some memory to be held")

    server.proc.send_signal(signal.SIGINT)

    assert server.wait_exit() == 0
    assert "stopping" in server.stdout
    wait_freed(backend)


def test_crash_after_exits_3_and_the_memory_comes_back(
    servers: Servers, backend: SimBackend
) -> None:
    server = servers.start("--vram-mb", "2048", "--crash-after", "0.5")

    assert server.wait_exit() == CRASH_EXIT_CODE

    assert "ready" in server.stdout  # so it held the memory before crashing
    assert server.stderr.splitlines()[-1] == "simulated crash"
    assert "stopping" not in server.stdout
    # The crashed process released nothing: the simulator notices the death itself.
    wait_freed(backend)


def test_crash_after_counts_from_process_start_so_it_can_crash_while_loading(
    servers: Servers, backend: SimBackend
) -> None:
    server = servers.start("--vram-mb", "2048", "--load-s", "1.0", "--crash-after", "0.3")

    assert server.wait_exit() == CRASH_EXIT_CODE

    assert "ready" not in server.stdout
    assert server.stderr.splitlines()[-1] == "simulated crash"
    wait_freed(backend)


def test_hang_never_becomes_ready(servers: Servers, backend: SimBackend) -> None:
    load_s = 0.2
    server = servers.start("--vram-mb", "1000", "--hang", "--load-s", str(load_s))
    half = round(1000 * HANG_FRACTION)
    stuck = (503, {"status": "loading", "progress": HANG_FRACTION})
    wait_for(
        lambda: used(backend) == half and server.health() == stuck,
        "the load to stop at the hang point",
    )

    # Keep watching for several load times: it stays loading with the partial memory.
    until = time.monotonic() + 3 * load_s
    while time.monotonic() < until:
        server.check_running()
        assert server.health() == stuck
        assert used(backend) == half
    chat = request(server.port, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert chat is not None and chat[0] == 503
    assert "ready" not in server.stdout


def test_exit_at_once_fails_before_allocating(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--vram-mb", "1000", "--exit-at-once")

    assert server.wait_exit() == 1

    assert "error: simulated startup failure" in server.stderr
    assert used(backend, 0) == used(backend, 1) == 0
    assert holders(backend, 0) == holders(backend, 1) == {}
    assert server.health() is None


def test_overuse_holds_more_than_the_estimate(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--vram-mb", "1000", "--overuse-mb", "500", "--load-s", "0.2")
    server.wait_health(200)

    assert used(backend) == 1500
    assert holders(backend) == {server.proc.pid: (1500, "sim-model")}


def test_fail_health_after_answers_500_while_running(servers: Servers) -> None:
    server = servers.start("--vram-mb", "100", "--fail-health-after", "0.5")
    assert server.wait_health(200) == {"status": "ok"}

    failed = server.wait_health(500)

    assert failed["status"] == "error"
    assert server.proc.poll() is None
    chat = request(server.port, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert chat is not None and chat[0] == 500


def test_say_every_makes_its_log_grow_once_ready(servers: Servers) -> None:
    server = servers.start("--vram-mb", "100", "--model", "talker", "--say-every", "0.05")
    server.wait_health(200)

    wait_for(lambda: "talker: line 3\n" in server.stdout, "three lines said")
    lines = server.stdout.splitlines()
    said = [line for line in lines if line.startswith("talker: line ")]
    assert said == [f"talker: line {n}" for n in range(1, len(said) + 1)]
    assert lines.index(said[0]) > next(
        i for i, line in enumerate(lines) if line.startswith("ready")
    )


def test_environment_variables_replace_the_flags(
    servers: Servers, backend: SimBackend, state: Path
) -> None:
    port = free_port()
    env = {ENV_MODEL: "m-env", ENV_PORT: str(port), ENV_GPUS: "1", ENV_STATE: str(state)}
    server = servers.start("--vram-mb", "700", port=port, env=env, flags=False)
    server.wait_health(200)

    assert used(backend, 0) == 0
    assert holders(backend, 1) == {server.proc.pid: (700, "m-env")}
    assert request(port, "/v1/models") is not None


def test_port_in_use_exits_1_with_a_clear_message(servers: Servers, backend: SimBackend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = servers.start("--vram-mb", "1000", port=port)

        assert server.wait_exit() == 1

    assert f"cannot listen on 127.0.0.1:{port}" in server.stderr
    assert "address already in use" in server.stderr
    assert used(backend, 0) == 0


def test_missing_state_file_exits_1(servers: Servers, tmp_path: Path) -> None:
    server = servers.start("--state", str(tmp_path / "nothing.bin"), "--vram-mb", "1")

    assert server.wait_exit() == 1
    assert "no simulated GPUs at" in server.stderr


def test_a_gpu_the_simulator_lacks_exits_1(servers: Servers, backend: SimBackend) -> None:
    server = servers.start("--gpus", "0,5", "--vram-mb", "1000")

    assert server.wait_exit() == 1
    assert "there is no simulated GPU 5" in server.stderr
    assert used(backend, 0) == 0


# ---- options (in-process) --------------------------------------------------------------------


def test_flags_win_over_environment_variables() -> None:
    env = {ENV_PORT: "9000", ENV_STATE: "/env/state", ENV_MODEL: "env-model", ENV_GPUS: "1"}

    options = parse_options(["--port", "9100", "--gpus", "0, 1"], env)

    assert options == SimServerOptions(
        port=9100, state_file=Path("/env/state"), model="env-model", gpus=(0, 1)
    )


def test_failure_knobs_read_from_the_environment() -> None:
    env = {
        ENV_PORT: "9000",
        ENV_STATE: "/s",
        "MODELBUS_SIM_HANG": "yes",
        "MODELBUS_SIM_CRASH_AFTER": "2.5",
        "MODELBUS_SIM_OVERUSE_MB": "64",
        "MODELBUS_SIM_VRAM_MB": "",  # empty counts as unset
    }

    options = parse_options([], env)

    assert options.hang and not options.exit_at_once
    assert options.crash_after_s == 2.5
    assert options.overuse_mb == 64
    assert options.vram_mb == 1024


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {ENV_STATE: "/s"}, "--port or MODELBUS_PORT"),
        (["--port", "1"], {}, "--state or MODELBUS_SIM_STATE"),
        (["--state", "/s"], {ENV_PORT: "http"}, "MODELBUS_PORT: invalid literal"),
        (["--state", "/s", "--port", "1", "--gpus", "0,0"], {}, "--gpus:"),
        (["--state", "/s", "--port", "1", "--utilization", "150"], {}, "not a percentage"),
        (["--state", "/s", "--port", "1"], {"MODELBUS_SIM_HANG": "maybe"}, "MODELBUS_SIM_HANG"),
        (["--state", "/s", "--port", "1", "--say-every", "0"], {}, "--say-every:"),
    ],
)
def test_bad_options_exit_2_naming_the_source(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv, env)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("gpus", "vram_mb", "overuse_mb", "split"),
    [
        ((0,), 1000, 0, {0: 1000}),
        ((0, 1), 1001, 0, {0: 501, 1: 500}),
        ((1, 0), 1000, 24, {1: 512, 0: 512}),
        ((0, 1, 2), 2, 0, {0: 1, 1: 1, 2: 0}),
    ],
)
def test_allocation_splits_evenly(
    gpus: tuple[int, ...], vram_mb: int, overuse_mb: int, split: dict[int, int]
) -> None:
    options = SimServerOptions(
        port=1, state_file=Path("/s"), gpus=gpus, vram_mb=vram_mb, overuse_mb=overuse_mb
    )

    assert options.allocation_mb() == split


def test_streams_a_chat_answer_as_server_sent_events(servers: Servers) -> None:
    server = servers.start("--model", "m-stream", "--answer-tokens", "5", "--tokens-per-s", "0")
    server.wait_health(200)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    call = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(call, timeout=10) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line for line in response.read().decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert len(chunks) == 5
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == "Simulated answer from m-stream. Simulated"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]


def test_answers_completions_and_embeddings(servers: Servers) -> None:
    server = servers.start("--model", "m-embed")
    server.wait_health(200)
    completion = request(server.port, "/v1/completions", {"prompt": "once upon"})
    assert completion is not None and completion[0] == 200
    assert completion[1]["choices"][0]["text"] == "Simulated answer from m-embed."
    embedded = request(server.port, "/v1/embeddings", {"input": ["a", "b", "a"]})
    assert embedded is not None and embedded[0] == 200
    vectors = [item["embedding"] for item in embedded[1]["data"]]
    assert len(vectors) == 3 and len(vectors[0]) == 8
    assert vectors[0] == vectors[2] != vectors[1]  # the same text, the same vector
    bad = request(server.port, "/v1/embeddings", {"input": 3})
    assert bad is not None and bad[0] == 400


def test_every_connection_has_tcp_nodelay() -> None:
    """A header and a body written apart must not wait on Nagle's algorithm: with
    keep-alive, each request after the first took 44 ms instead of 1 ms without it."""
    from devtools.sim_api import Phase, SimHttpServer, Status, _Handler

    seen: list[int] = []
    original = _Handler.setup

    def setup(handler: _Handler) -> None:
        original(handler)
        seen.append(handler.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    _Handler.setup = setup  # type: ignore[method-assign]
    server = SimHttpServer(("127.0.0.1", 0), "m-nodelay")
    server.status = Status(Phase.READY, 1.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        assert request(server.server_address[1], "/health") == (200, {"status": "ok"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        _Handler.setup = original  # type: ignore[method-assign]
    assert seen and all(seen)


# ---- sleep mode (devtools/sim_sleep.py): vLLM's and SGLang's routes --------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def post(server: Server, path: str, body: bytes = b"", method: str = "POST") -> tuple[int, bytes]:
    call = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(call, timeout=DEADLINE_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def post_aside(server: Server, path: str) -> tuple[threading.Thread, list[tuple[int, bytes]]]:
    """POST ``path`` on a thread of its own; its answer lands in the list (none when the
    connection broke: the server exited first)."""
    answers: list[tuple[int, bytes]] = []

    def call() -> None:
        with contextlib.suppress(OSError):
            answers.append(post(server, path))

    thread = threading.Thread(target=call)
    thread.start()
    return thread, answers


def rss_mb(server: Server) -> float:
    return float(psutil.Process(server.proc.pid).memory_info().rss) / 2**20


def sleepy(servers: Servers, api: str = "vllm", *extra: str) -> Server:
    server = servers.start(
        "--vram-mb", "4096", "--sleep-api", api, "--sleep-ram-mb", "64", "--wake-s", "0.4",
        *extra,
    )  # fmt: skip
    server.wait_health(200)
    return server


def refused_chat(server: Server) -> str:
    """The message of the 503 an inference request gets."""
    reply = request(server.port, "/v1/chat/completions", CHAT)
    assert reply is not None and reply[0] == 503, reply
    message: str = reply[1]["error"]["message"]
    assert reply[1]["error"]["code"] == 503
    return message


def chat_answers(server: Server) -> bool:
    reply = request(server.port, "/v1/chat/completions", CHAT)
    return reply is not None and reply[0] == 200


def test_vllm_level_1_frees_the_vram_holds_host_ram_and_wakes_in_its_time(
    servers: Servers, backend: SimBackend
) -> None:
    server = sleepy(servers)
    assert request(server.port, "/is_sleeping") == (200, {"is_sleeping": False})
    before = rss_mb(server)

    assert post(server, "/sleep?level=1") == (200, b"")
    assert used(backend) == 0
    assert request(server.port, "/is_sleeping") == (200, {"is_sleeping": True})
    assert rss_mb(server) - before >= 60  # 64 MiB of pages really written
    # vLLM's /health stays 200 asleep; the body says the state.
    assert request(server.port, "/health") == (200, {"status": "sleeping", "level": 1})
    assert "POST /wake_up" in refused_chat(server)
    models = request(server.port, "/v1/models")  # needs no weights: vLLM serves it asleep
    assert models is not None and models[0] == 200
    assert post(server, "/sleep?level=1") == (200, b"")  # asleep already: nothing changes
    assert post(server, "/sleep?level=2") == (200, b"")  # nor at another level, as vLLM

    began = time.monotonic()
    assert post(server, "/wake_up") == (200, b"")
    assert time.monotonic() - began >= 0.4
    assert used(backend) == 4096
    assert request(server.port, "/is_sleeping") == (200, {"is_sleeping": False})
    assert request(server.port, "/health") == (200, {"status": "ok"})
    assert rss_mb(server) - before < 32
    assert chat_answers(server)
    assert post(server, "/wake_up?tags=weights") == (200, b"")  # awake already: nothing
    wait_for(lambda: "awake" in server.stdout, "the awake line")
    assert "sleeping (level 1)" in server.stdout
    assert "falling asleep (level 1)" in server.stderr and "waking (level 1)" in server.stderr


def test_a_wake_raises_the_memory_in_steps_from_what_sleep_kept(
    servers: Servers, backend: SimBackend
) -> None:
    server = sleepy(servers, "vllm", "--sleep-vram-mb", "512", "--wake-s", "1.0")
    assert post(server, "/sleep")[0] == 200
    assert used(backend) == 512
    waker, woken = post_aside(server, "/wake_up")
    seen: list[int] = []

    def back() -> bool:
        seen.append(used(backend))
        reply = server.health()
        return reply is not None and reply[1]["status"] == "ok"

    wait_for(back, "the wake to end")
    waker.join(DEADLINE_S)
    assert woken == [(200, b"")]
    assert seen == sorted(seen) and min(seen) >= 512, seen
    assert any(512 < mb < 4096 for mb in seen), seen


def test_vllm_level_2_holds_no_ram_and_needs_its_weights_reloaded(
    servers: Servers, backend: SimBackend
) -> None:
    server = sleepy(servers, "vllm", "--gpus", "0,1", "--reload-s", "0.3")
    before = rss_mb(server)
    assert post(server, "/sleep?level=2") == (200, b"")
    assert used(backend, 0) == used(backend, 1) == 0
    assert rss_mb(server) - before < 32
    reload_asleep = post(server, "/collective_rpc", b'{"method": "reload_weights"}')
    assert reload_asleep[0] == 500 and b"POST /wake_up first" in reload_asleep[1]

    assert post(server, "/wake_up") == (200, b"")
    assert (used(backend, 0), used(backend, 1)) == (2048, 2048)
    assert request(server.port, "/is_sleeping") == (200, {"is_sleeping": False})
    assert request(server.port, "/health") == (200, {"status": "weights_discarded", "level": 2})
    assert "reload_weights" in refused_chat(server)

    began = time.monotonic()
    reloaded = post(server, "/collective_rpc", b'{"method": "reload_weights"}')
    assert time.monotonic() - began >= 0.3
    assert reloaded[0] == 200
    assert json.loads(reloaded[1]) == {"results": [None, None]}  # a worker per GPU
    assert post(server, "/reset_prefix_cache") == (200, b"")
    assert chat_answers(server)
    assert "weights reloaded" in server.stdout


def test_vllm_routes_refuse_what_vllm_refuses(servers: Servers) -> None:
    server = sleepy(servers)

    not_json = post(server, "/collective_rpc", b"{not json")
    assert not_json[0] == 400
    error = json.loads(not_json[1])["error"]
    assert error["type"] == "Bad Request" and error["code"] == 400 and error["param"] is None
    assert error["message"].startswith("JSON decode error")
    no_method = post(server, "/collective_rpc", b"{}")
    assert no_method[0] == 400
    assert json.loads(no_method[1])["error"]["message"] == "Missing 'method' in request body"
    assert post(server, "/collective_rpc", b'{"method": "sleep"}')[0] == 500
    assert post(server, "/sleep?level=3")[0] == 400
    assert post(server, "/sleep", method="GET")[0] == 405  # POST routes, as FastAPI answers
    assert chat_answers(server)  # none of it changed anything


def test_is_sleeping_answers_after_a_sleep_under_way(servers: Servers) -> None:
    server = sleepy(servers, "vllm", "--sleep-s", "0.5")
    sleeper, slept = post_aside(server, "/sleep")
    wait_for(lambda: "falling asleep" in server.stderr, "the sleep to begin")
    assert server.health() == (200, {"status": "falling_asleep", "level": 1})
    assert "sleeping" in refused_chat(server)

    # vLLM's engine answers in turn: not before the sleep is done.
    assert request(server.port, "/is_sleeping") == (200, {"is_sleeping": True})
    sleeper.join(DEADLINE_S)
    assert slept == [(200, b"")]


def test_sglang_releases_and_resumes_its_memory(servers: Servers, backend: SimBackend) -> None:
    server = sleepy(servers, "sglang", "--sleep-vram-mb", "512")
    before = rss_mb(server)

    assert post(server, "/release_memory_occupation", b"{}") == (200, b"null")
    assert used(backend) == 512  # what it keeps (its CUDA context)
    assert rss_mb(server) - before >= 60  # the weights' copy in host RAM
    # SGLang's /health runs a generation, which its scheduler skips while released.
    assert request(server.port, "/health") == (503, {"status": "sleeping", "level": 1})
    assert "/resume_memory_occupation" in refused_chat(server)
    assert request(server.port, "/is_sleeping") == (
        404,
        {"error": {"message": "no route for GET /is_sleeping", "type": "not_found_error",
                   "code": 404}},
    )  # fmt: skip
    assert post(server, "/sleep")[0] == 404

    began = time.monotonic()
    # SGLang takes GET as it takes POST; the tags are accepted (and ignored: all comes back).
    resumed = post(server, "/resume_memory_occupation", b'{"tags": ["weights"]}', method="GET")
    assert resumed == (200, b"null")
    assert time.monotonic() - began >= 0.4
    assert used(backend) == 4096
    assert rss_mb(server) - before < 32
    assert request(server.port, "/health") == (200, {"status": "ok"})
    assert chat_answers(server)


def test_sglang_refuses_what_sglang_refuses(servers: Servers, backend: SimBackend) -> None:
    server = sleepy(servers, "sglang")

    missing = post(server, "/release_memory_occupation")
    assert missing[0] == 422
    assert json.loads(missing[1])["detail"][0]["msg"] == "Field required"
    assert post(server, "/release_memory_occupation", b'{"tags": "weights"}')[0] == 422
    unknown = post(server, "/release_memory_occupation", b'{"tags": ["optimizer"]}')
    assert unknown[0] == 400 and b"optimizer" in unknown[1]
    # Nothing was released, so a resume fails (SGLang's scheduler would go down with it).
    resumed = post(server, "/resume_memory_occupation", b"{}")
    assert resumed[0] == 500 and b"not released" in resumed[1]
    assert used(backend) == 4096
    assert chat_answers(server)


def test_without_a_sleep_api_there_are_no_such_routes(servers: Servers) -> None:
    server = servers.start("--vram-mb", "1024")
    server.wait_health(200)
    assert post(server, "/sleep?level=1")[0] == 404
    assert post(server, "/wake_up")[0] == 404
    assert post(server, "/collective_rpc", b'{"method": "reload_weights"}')[0] == 404
    is_sleeping = request(server.port, "/is_sleeping")
    assert is_sleeping is not None and is_sleeping[0] == 404
    assert post(server, "/release_memory_occupation", b"{}")[0] == 404
    assert post(server, "/resume_memory_occupation", b"{}")[0] == 404


def test_sigterm_while_asleep_exits_0_and_releases_everything(
    servers: Servers, backend: SimBackend
) -> None:
    server = sleepy(servers, "vllm", "--sleep-vram-mb", "256")
    assert post(server, "/sleep")[0] == 200
    assert used(backend) == 256
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert server.stdout.splitlines()[-1] == "stopping"
    assert server.proc.pid not in holders(backend)
    wait_freed(backend)


def test_sigterm_while_waking_stops_the_wake_and_exits_0(
    servers: Servers, backend: SimBackend
) -> None:
    # A wake far longer than the test waits for the exit: the signal must cut it short.
    server = sleepy(servers, "vllm", "--wake-s", str(10 * DEADLINE_S))
    assert post(server, "/sleep")[0] == 200
    waker, woken = post_aside(server, "/wake_up")
    wait_for(lambda: "waking" in server.stderr, "the wake to begin")
    assert server.health() == (200, {"status": "waking", "level": 1})

    server.proc.send_signal(signal.SIGTERM)

    assert server.wait_exit() == 0
    waker.join(DEADLINE_S)
    # Answered 503 (the server is stopping) or cut off by the exit: never woken.
    assert not woken or woken[0][0] == 503, woken
    assert "awake" not in server.stdout
    wait_freed(backend)


def test_sleep_while_loading_is_refused(servers: Servers) -> None:
    server = servers.start("--vram-mb", "1024", "--load-s", "5", "--sleep-api", "vllm")
    server.wait_health(503)
    status, body = post(server, "/sleep")
    assert status == 503 and b"not loaded" in body


def test_sleep_options_read_from_the_environment() -> None:
    env = {ENV_PORT: "9000", ENV_STATE: "/s", ENV_LOAD_S: "3", ENV_SLEEP_API: "sglang"}
    env |= {ENV_SLEEP_RAM_MB: "64", ENV_SLEEP_VRAM_MB: "500", ENV_WAKE_S: "0.25", ENV_SLEEP_S: "0"}

    options = parse_options(["--wake-s", "0.75"], env)

    assert options.sleep == SleepOptions(
        api=SleepApi.SGLANG,
        sleep_ram_mb=64,
        sleep_vram_mb=500,
        wake_s=0.75,
        sleep_s=0.0,
        reload_s=3.0,  # a reload takes a load's time unless told
    )
    assert parse_options(["--port", "1", "--state", "/s"], {}).sleep == SleepOptions()

"""A development fallback broker for the demo when mosquitto is not installed.

``EmbeddedBroker`` runs amqtt (MQTT 3.1.1 only) in a child process
(``python -m devtools.embedded_broker --port N``) on 127.0.0.1, anonymous and
without persistence. The child exits when its standard input reaches end of
file: the parent holds the other end of that pipe, and the kernel closes it
however the parent ends, SIGKILL included. (PR_SET_PDEATHSIG would fire when
the *thread* that started the child exits, which a demo starting the broker
from a worker thread would trip over.)

``start_demo_broker`` picks mosquitto when it is installed and this otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devtools.brokers import (
    DEMO_CONFIG,
    BrokerError,
    ChildBroker,
    MosquittoBroker,
    mosquitto_binary,
    port_accepts,
)

EMBEDDED_DESCRIPTION = "embedded amqtt broker (development fallback, MQTT 3.1.1 only)"
MOSQUITTO_DESCRIPTION = "mosquitto"
READY_LINE = b"embedded broker ready\n"
# MQTT 3.1.1's protocol level; amqtt speaks nothing else.
_MQTT_311_LEVEL = 4


class EmbeddedBroker(ChildBroker):
    """One amqtt child process; the same surface as MosquittoBroker in the demo."""

    log_name = "amqtt.log"

    def start(self, timeout_s: float = 15.0, *, verbose: bool = False) -> None:
        if self.process is not None:
            return
        if port_accepts(self.port):
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is already in use: stop what listens there "
                "or choose another port"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        package_root = str(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "devtools.embedded_broker", "--port", str(self.port)]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *(["--verbose"] if verbose else [])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": python_path},
                # A Ctrl-C in the demo's terminal must not reach the broker before
                # the demo has stopped its agent; the demo stops it itself.
                start_new_session=True,
            )
        try:
            self._wait_until_ready(self.process, timeout_s)
        except BrokerError:
            self.stop()
            raise

    def _wait_until_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        """The child says it is ready once amqtt listens on the port."""
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        received = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while READY_LINE not in received:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(
                        f"the embedded amqtt broker did not start in time: {self.log_tail()}"
                    )
                if selector.select(left):
                    chunk = os.read(process.stdout.fileno(), 4096)
                    if not chunk:
                        process.wait()
                        raise BrokerError(
                            f"the embedded amqtt broker exited at start: {self.log_tail()}"
                        )
                    received += chunk
        # No probe connection after this: amqtt logs an empty connection as an error,
        # and the child announces itself only once its listening socket is open.
        process.stdout.close()


def start_demo_broker(
    port: int | None, workdir: Path, *, prefer_embedded: bool = False
) -> tuple[MosquittoBroker | EmbeddedBroker, str]:
    """A started, loopback-only, anonymous broker and a description of which one runs:
    mosquitto when it is installed, the embedded amqtt fallback otherwise."""
    broker: MosquittoBroker | EmbeddedBroker
    if mosquitto_binary() is not None and not prefer_embedded:
        broker, description = (
            MosquittoBroker(DEMO_CONFIG, port=port, workdir=workdir),
            MOSQUITTO_DESCRIPTION,
        )
    else:
        broker, description = EmbeddedBroker(port=port, workdir=workdir), EMBEDDED_DESCRIPTION
    broker.start()
    return broker, description


# --- the child process ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.embedded_broker",
        description=f"{EMBEDDED_DESCRIPTION} on 127.0.0.1; exits when stdin closes.",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--verbose", action="store_true", help="log amqtt at INFO")
    args = parser.parse_args(argv)

    import logging
    import warnings

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.verbose:
        warnings.simplefilter("ignore", DeprecationWarning)
    try:
        return asyncio.run(_serve(args.port))
    except KeyboardInterrupt:
        return 0


async def _serve(port: int) -> int:
    from amqtt.broker import Broker

    _refuse_other_protocol_levels()
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        # Only anonymous auth: no $SYS publisher, no packet logger, no persistence.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, done.set)

    broker = Broker(config)
    try:
        await broker.start()
    except Exception as exc:
        print(f"embedded broker: cannot listen on 127.0.0.1:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        watcher = await _exit_when_stdin_closes(done)
        _announce_ready()
        await done.wait()
        watcher.close()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), timeout=5)
    return 0


async def _exit_when_stdin_closes(done: asyncio.Event) -> asyncio.BaseTransport:
    """Set ``done`` at end of stdin, that is when the parent process is gone."""
    loop = asyncio.get_running_loop()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            done.set()

        def eof_received(self) -> bool:
            done.set()
            return False

    transport, _ = await loop.connect_read_pipe(Watch, sys.stdin)
    return transport


def _announce_ready() -> None:
    os.write(sys.stdout.fileno(), READY_LINE)
    # Nothing else may go to the parent's pipe (it stops reading): send stray
    # prints to the log instead.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _refuse_other_protocol_levels() -> None:
    """amqtt parses an MQTT 5 CONNECT as 3.1.1, reads its properties as a client id
    length and waits for bytes that never come, so a client trying 5 first hangs
    until its connect timeout. Read the packet to its end instead and let amqtt
    answer 'unacceptable protocol version', which clients take as 'try 3.1.1'."""
    from amqtt.mqtt.connect import ConnectPayload

    original = ConnectPayload.from_stream.__func__

    async def from_stream(cls: Any, reader: Any, fixed_header: Any, variable_header: Any) -> Any:
        if variable_header is None or variable_header.proto_level == _MQTT_311_LEVEL:
            return await original(cls, reader, fixed_header, variable_header)
        consumed = 2 + len(variable_header.proto_name.encode()) + 1 + 1 + 2
        rest = fixed_header.remaining_length - consumed
        if rest > 0:
            await reader.read(rest)
        # No will, no credentials, clean session: only the protocol check can fail.
        variable_header.flags = 0x02
        payload = cls()
        payload.client_id = "unsupported-protocol-level"
        return payload

    ConnectPayload.from_stream = classmethod(from_stream)


if __name__ == "__main__":
    sys.exit(main())

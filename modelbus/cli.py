"""``modelbus``: one command, several subcommands.

Exit codes: 0 ok; 1 runtime failure (no GPU, broker refused the agent, the demo's broker or
agent died) or, for the client commands (status, load, unload, switch, plan, install,
uninstall, cancel, logs, history, catalog, events), an error reply, a failed job, a plan that cannot
be carried out or a host that is not online; 2 usage or configuration error (for the client
commands also a value the contract refuses); 3 timeout (client commands); 4 broker
unreachable or refusing the client (client commands). See docs/client.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelbus.client_args import CLIENT_COMMANDS, add_client_commands, client_fields

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.gpu.base import GpuBackend
    from agent.service import AgentService

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SHUTDOWN_GRACE_S = 8.0


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each subcommand's own, which names itself in its errors."""
    parser = argparse.ArgumentParser(
        prog="modelbus", description="Share too little VRAM between AI model servers, over MQTT."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the GPU host agent")
    agent.add_argument("--config", type=Path, help="YAML configuration file")
    agent.add_argument("--broker", help="broker URL, mqtt://user:pass@host:port or mqtts://...")
    agent.add_argument("--host-id", help="this host's id in topics ([a-z0-9_-]{1,64})")
    agent.add_argument("--prefix", help="topic prefix (default modelbus)")
    agent.add_argument("--sim", action="store_true", help="use simulated GPUs instead of NVML")
    agent.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="the gateway's address (http.listen); 'off' turns HTTP off",
    )
    agent.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser("demo", help="broker + simulated GPU agent, for trying modelbus")
    demo.add_argument(
        "--headless", action="store_true", help="no TUI; print command lines to try it with"
    )
    demo.add_argument("--port", type=int, help="broker port (default: a free one)")
    demo.add_argument(
        "--embedded-broker",
        action="store_true",
        help="use the embedded amqtt broker (3.1.1, development fallback) even if mosquitto exists",
    )

    tui = sub.add_parser("tui", help="the terminal UI: every host on the bus, live")
    tui.add_argument("--broker", help="broker URL, mqtt://user:pass@host:port or mqtts://...")
    tui.add_argument("--host", help="the host to show first")
    tui.add_argument("--prefix", help="topic prefix (default modelbus)")
    tui.add_argument("--config", type=Path, help="read the broker section of this agent config")

    schema = sub.add_parser(
        "schema", help="write the JSON Schemas of every payload and the HTTP API's OpenAPI"
    )
    schema.add_argument("--out", type=Path, default=Path("docs/schema"))
    schema.add_argument("--check", action="store_true", help="fail if the files are out of date")

    add_client_commands(sub)

    sim = sub.add_parser("sim", help="poke the simulated GPUs")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    show = sim_sub.add_parser("show", help="print the simulated GPUs")
    show.add_argument("--state", type=Path, required=True, help="the simulator state file")
    alloc = sim_sub.add_parser("alloc", help="hold memory on a simulated GPU until stopped")
    alloc.add_argument("--state", type=Path, required=True, help="the simulator state file")
    alloc.add_argument("--gpu", type=int, default=0)
    alloc.add_argument("--mb", type=int, required=True)
    alloc.add_argument("--ramp", type=float, default=0.0, help="seconds to ramp up")
    alloc.add_argument("--hold", type=float, help="seconds to hold (default: until stopped)")
    alloc.add_argument("--name", default="alloc")
    return parser, sub.choices


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parsers()
    args, unknown = parser.parse_known_args(argv)
    command_parser = commands.get(args.command, parser)
    if unknown:
        # argparse would blame "modelbus"; the subcommand's usage shows what it takes.
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "unload" and (args.model is None) == (not args.all):
        command_parser.error("give a MODEL or --all (not both)")
    if args.command == "unload" and args.all and args.wait:
        command_parser.error("--wait cannot be used with --all (one job per model)")
    if args.command == "agent":
        return run_agent(args)
    if args.command == "demo":
        from modelbus.demo import run_demo

        return run_demo(
            headless=args.headless, port=args.port, prefer_embedded=args.embedded_broker
        )
    if args.command == "tui":
        return run_tui(args)
    if args.command == "schema":
        return write_schemas(args.out, check=args.check)
    if args.command == "sim":
        return run_sim(args)
    if args.command in CLIENT_COMMANDS:
        return run_client(args)
    return EXIT_USAGE


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_agent(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from bus.settings import ConfigError

    overrides = {
        "broker.url": args.broker,
        "host_id": args.host_id,
        "prefix": args.prefix,
        "gpu.backend": "sim" if args.sim else None,
        "http.listen": args.http_listen,
        "log_level": args.log_level,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"modelbus agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(config.log_level)
    from agent.gateway.errors import GatewayListenError
    from agent.gpu.base import GpuUnavailableError
    from agent.service import AgentService
    from bus.mqtt import BrokerRefusedError

    try:
        backend = open_backend(config)
        service = AgentService(config, backend)
        asyncio.run(_serve(service, args.config, overrides))
    except (GpuUnavailableError, GatewayListenError) as exc:
        print(f"modelbus agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokerRefusedError as exc:
        print(f"modelbus agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception:
        # The connection was dropped without DISCONNECT: the broker says "offline".
        logging.getLogger("modelbus.agent").critical(
            "the agent stopped on an unexpected error", exc_info=True
        )
        return EXIT_FAILURE
    return EXIT_OK


async def _serve(
    service: AgentService, config_path: Path | None, overrides: dict[str, object]
) -> None:
    from bus.mqtt import BrokerRefusedError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def shut_down() -> None:
        # A shutdown that hangs would keep the host "online" with no agent behind it:
        # after the grace period, print where every thread is stuck and exit.
        faulthandler.dump_traceback_later(SHUTDOWN_GRACE_S, exit=True)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shut_down)
    # SIGHUP re-reads the catalog, as daemons do; running models are left alone.
    loop.add_signal_handler(signal.SIGHUP, service.request_reload, config_path, overrides)
    await service.start()
    try:
        await service.run(stop)
    except* BrokerRefusedError as group:
        raise group.exceptions[0] from None


def run_tui(args: argparse.Namespace) -> int:
    """The TUI reads the broker settings the agent reads (file, MODELBUS_BROKER_* env,
    flags), so the same credentials and TLS files work for both."""
    import secrets
    import socket

    from bus.mqtt import settings_from_config
    from bus.settings import ConfigError, load_bus_config
    from shared.topics import sanitize_host_id

    overrides = {"broker.url": args.broker, "prefix": args.prefix}
    try:
        config = load_bus_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"modelbus tui: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.CRITICAL)  # the screen is the TUI's; logs would tear it
    from tui.app import build_app

    # Random, so that nobody can guess it and knock this TUI off the broker.
    client_id = f"modelbus-tui-{sanitize_host_id(socket.gethostname())}-{secrets.token_hex(6)}"
    settings = settings_from_config(config.broker, client_id, persistent_session=False)
    app = build_app(settings, config.prefix, host=args.host)
    return app.run() or EXIT_OK


def run_client(args: argparse.Namespace) -> int:
    """A client command reads the broker settings as ``modelbus tui`` does (file,
    MODELBUS_BROKER* env, flags) and connects with a fresh id and a clean session."""
    import secrets

    from bus.mqtt import settings_from_config
    from bus.settings import ConfigError, load_bus_config
    from modelbus.bus_commands import run_command, run_events
    from modelbus.client_session import Request
    from modelbus.log_follow import follow_log
    from shared.topics import CommandName

    overrides = {"broker.url": args.broker, "prefix": args.prefix}
    try:
        config = load_bus_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"modelbus {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Library logs would break the one-line messages; what matters is in the exit code.
    logging.basicConfig(level=logging.CRITICAL)
    client_id = f"modelbus-cli-{secrets.token_hex(6)}"
    settings = settings_from_config(config.broker, client_id, persistent_session=False)
    if args.command == "events":
        return run_events(
            settings,
            config.prefix,
            host=args.host,
            count=args.count,
            json_output=args.json,
            timeout_s=args.timeout,
        )
    add_after = args.command == "install" and args.add
    request = Request(
        command=CommandName(args.command),
        fields=client_fields(args),
        host=args.host,
        wait=getattr(args, "wait", False) or add_after,
        json_output=args.json,
        timeout_s=args.timeout,
        admin=getattr(args, "admin", False),
    )
    if add_after:
        from modelbus.bus_commands import install_and_add

        return run_command(settings, config.prefix, request, runner=install_and_add)
    if args.command == "logs" and args.follow:
        # Ctrl-C is how a follow ends: exit 0, as events.
        return run_command(settings, config.prefix, request, runner=follow_log, interrupted=EXIT_OK)
    return run_command(settings, config.prefix, request)


def write_schemas(out: Path, *, check: bool) -> int:
    from agent.gateway.openapi import document
    from shared.schema import all_schemas, render

    stale = []
    # The HTTP server's OpenAPI document beside the payloads' schemas, from the same models.
    for name, schema in (all_schemas() | {"openapi.json": document()}).items():
        path = out / name
        text = render(schema)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        print(f"out of date in {out}: {', '.join(stale)}; run 'modelbus schema'", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{out}: {len(stale)} schema file(s) {'stale' if check else 'written'}")
    return EXIT_OK


def open_backend(config: AgentConfig) -> GpuBackend:
    """The GPU backend the configuration asks for. Chosen here, in the application layer:
    the daemon gets a backend and never imports the simulator (development tooling)."""
    if config.gpu.backend == "sim":
        from devtools.gpu_sim import SimBackend, SimGpuSpec

        sim = config.gpu.sim
        specs = [
            SimGpuSpec(
                name=gpu.name,
                memory_total_mb=gpu.memory_total_mb,
                foreign_mb=gpu.foreign_mb,
                power_limit_w=gpu.power_limit_w,
            )
            for gpu in sim.gpus
        ]
        return SimBackend(config.sim_state_file, specs, release_delay_s=sim.release_delay_s)
    from agent.gpu.nvml import NvmlBackend

    return NvmlBackend()


def run_sim(args: argparse.Namespace) -> int:
    from devtools import gpu_sim as sim

    if args.sim_command == "show":
        client = sim.SimGpuClient(args.state)
        for gpu in client.snapshot():
            print(
                f"GPU {gpu.index} {gpu.name}: {gpu.memory_used_mb}/{gpu.memory_total_mb} MiB used, "
                f"{gpu.utilization_percent}% util, {len(gpu.processes)} process(es)"
            )
            for process in gpu.processes:
                print(f"  pid {process.pid} {process.name or '?'}: {process.used_mb} MiB")
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):
        sim.hold_allocation(
            args.state, args.gpu, args.mb, ramp_s=args.ramp, hold_s=args.hold, name=args.name
        )
    return EXIT_OK

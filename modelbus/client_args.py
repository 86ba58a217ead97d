"""The client commands' arguments (``modelbus status``, ``switch``, ``catalog`` ...): their
parsers, and the command's JSON fields from what was given."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CLIENT_COMMANDS = frozenset(
    {"status", "load", "unload", "switch", "plan", "install", "uninstall", "cancel", "events"}
    | {"logs", "history", "catalog"}
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _gpu_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU index (0, 1, ...)") from None
    if not 0 <= value <= 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU index between 0 and 63")
    return value


def _host_id(text: str) -> str:
    from shared.topics import is_host_id

    if not is_host_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host id: use 1-64 of a-z, 0-9, '_' and '-'"
        )
    return text


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client commands: one command to one host over the bus (modelbus/bus_commands.py)."""
    bus = argparse.ArgumentParser(add_help=False)
    where = bus.add_argument_group("bus")
    where.add_argument("--broker", help="broker URL, mqtt://user:pass@host:port or mqtts://...")
    where.add_argument("--prefix", help="topic prefix (default modelbus)")
    where.add_argument("--config", type=Path, help="read the broker section of this agent config")
    where.add_argument(
        "--host", type=_host_id, help="the host to command (default: the only one online)"
    )
    where.add_argument("--json", action="store_true", help="print JSON only on stdout")
    where.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="seconds the whole command may take, connecting included (default: 30 for the "
        "reply; no limit on a --wait job)",
    )
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument(
        "--wait", action="store_true", help="follow the job until it ends, showing its progress"
    )

    def add(name: str, help_text: str, *, wait: bool = False) -> argparse.ArgumentParser:
        parents = [bus, job] if wait else [bus]
        # No abbreviations: '--ex' silently meaning '--exclusive' is a surprise, not a help.
        return sub.add_parser(name, help=help_text, parents=parents, allow_abbrev=False)

    add("status", "print a host's GPUs, models and jobs")
    load = add("load", "start a model next to what runs (never evicts)", wait=True)
    load.add_argument("model", metavar="MODEL")
    load.add_argument("--gpu", type=_gpu_index, metavar="N", help="load on this GPU")
    load.add_argument("--priority", type=int, metavar="N", help="place in the swap queue")
    unload = add("unload", "stop a model", wait=True)
    unload.add_argument("model", metavar="MODEL", nargs="?")
    unload.add_argument("--all", action="store_true", help="stop every loaded model")
    unload.add_argument("--force", action="store_true", help="stop it even if pinned")
    switch = add("switch", "make a model ready, evicting what must go", wait=True)
    switch.add_argument("model", metavar="MODEL")
    switch.add_argument("--gpu", type=_gpu_index, metavar="N", help="load on this GPU")
    switch.add_argument("--exclusive", action="store_true", help="stop every evictable model")
    switch.add_argument(
        "--force", action="store_true", help="also stop models of higher priority (not pinned)"
    )
    plan = add("plan", "what a switch would do now; changes nothing")
    plan.add_argument("model", metavar="MODEL")
    plan.add_argument("--gpu", type=_gpu_index, metavar="N", help="plan for this GPU")
    plan.add_argument("--exclusive", action="store_true", help="plan an exclusive switch")
    plan.add_argument("--force", action="store_true", help="plan a switch with --force")
    install = add("install", "download weights from the Hugging Face Hub", wait=True)
    install.add_argument("repo", metavar="REPO", help="org/name on the hub")
    install.add_argument("--revision", metavar="R", help="branch, tag or commit (default main)")
    install.add_argument(
        "--include", nargs="+", metavar="GLOB", action="extend", help="only files matching"
    )
    install.add_argument(
        "--exclude", nargs="+", metavar="GLOB", action="extend", help="skip files matching"
    )
    install.add_argument("--name", metavar="N", help="folder name (default: the repo's last part)")
    install.add_argument(
        "--add",
        action="store_true",
        help="then add the entry its install suggests to the catalog (implies --wait)",
    )
    uninstall = add("uninstall", "delete installed or partial weights", wait=True)
    uninstall.add_argument("name", metavar="NAME")
    cancel = add("cancel", "cancel a queued or running job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    logs = add("logs", "print a model server's last output lines; -f follows them")
    logs.add_argument("model", metavar="MODEL")
    logs.add_argument("-n", "--lines", type=_count, metavar="N", help="how many (default 200)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="then print new lines as they come (Ctrl-C)"
    )
    history = add("history", "print the last load times of each model, or of MODEL")
    history.add_argument("model", metavar="MODEL", nargs="?")
    history.add_argument(
        "-n", "--limit", type=_count, metavar="N", help="loads per model (default 20)"
    )
    catalog = add("catalog", "show the catalog, or add or remove an entry (no file edit)")
    catalog.add_argument("action", choices=["show", "add", "remove"], nargs="?", default="show")
    catalog.add_argument("name", metavar="NAME", nargs="?", help="the model (add, remove)")
    catalog.add_argument("--preset", choices=["llama-cpp", "vllm", "sglang", "openai"])
    catalog.add_argument("--weights", metavar="W", help="installed weights it serves")
    catalog.add_argument("--vram-mb", type=_count, metavar="N", help="MiB it needs")
    catalog.add_argument("--gpus", metavar="0,1", help="the GPUs it runs on")
    catalog.add_argument(
        "--entry", metavar="JSON", help="any other keys of the entry, as a JSON object"
    )
    catalog.add_argument(
        "--admin",
        action="store_true",
        help="send it on the admin topic (an entry with a command line or image; the admin "
        "role's account)",
    )
    events = add("events", "print events as they arrive (Ctrl-C stops)")
    events.add_argument("--count", type=_count, metavar="N", help="stop after N events")


def client_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The command's JSON fields; unset options are left out for the agent's defaults."""
    names = {
        "status": (),
        "load": ("model", "gpu", "priority"),
        "unload": ("model", "all", "force"),
        "switch": ("model", "gpu", "exclusive", "force"),
        "plan": ("model", "gpu", "exclusive", "force"),
        "install": ("repo", "revision", "include", "exclude", "name"),
        "uninstall": ("name",),
        "cancel": ("job_id",),
        "logs": ("model", "lines"),
        "history": ("model", "limit"),
        "catalog": ("action", "name", "weights"),
    }[args.command]
    values = {name: getattr(args, name) for name in names}
    fields = {name: value for name, value in values.items() if value not in (None, False)}
    if args.command == "catalog":
        entry = _catalog_entry(args)
        if entry:
            fields["entry"] = entry
    return fields


def _catalog_entry(args: argparse.Namespace) -> dict[str, Any]:
    """``catalog add``'s entry from its options; empty: the install's suggested entry."""
    entry: dict[str, Any] = {}
    if args.entry:
        try:
            entry = json.loads(args.entry)
        except ValueError:
            entry = {"--entry": args.entry}  # refused by the contract, naming it
    if args.preset:
        entry["preset"] = args.preset
    if args.vram_mb:
        entry["vram_mb"] = args.vram_mb
    if args.gpus:
        entry["gpus"] = [int(g) if g.strip().isdigit() else g for g in args.gpus.split(",")]
    return entry

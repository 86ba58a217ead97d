"""Topic builders, subscription filters and the names that appear in topics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_PREFIX = "modelbus"
HOST_ID_PATTERN = r"[a-z0-9_-]{1,64}"
MODEL_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
JOB_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
# A prefix is one or more plain topic levels: no wildcards, no empty levels.
PREFIX_PATTERN = r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,3}"
HOME_ASSISTANT_STATUS = "homeassistant/status"
# ``P/reply/#`` was the fleet-wide reply tree of protocol 1; it stays out of the host
# namespace, so that no agent can be given it and operators' ``P/+/cmd/#`` never
# names a topic there.
RESERVED_HOST_IDS = frozenset({"reply"})

_HOST_ID = re.compile(HOST_ID_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_PREFIX = re.compile(PREFIX_PATTERN)


class CommandName(StrEnum):
    LOAD = "load"
    UNLOAD = "unload"
    SWITCH = "switch"
    PLAN = "plan"
    INSTALL = "install"
    UNINSTALL = "uninstall"
    CANCEL = "cancel"
    STATUS = "status"
    LOGS = "logs"
    HISTORY = "history"
    CATALOG = "catalog"


# Commands whose replies may hold secrets (a server's output can print keys and tokens):
# they are answered only under ``P/H/reply/private/``, which the shipped ACL keeps from
# viewers (mosquitto/acl).
PRIVATE_COMMANDS = frozenset({CommandName.LOGS})
PRIVATE_REPLY_LEVEL = "private"


def is_host_id(value: str) -> bool:
    return _HOST_ID.fullmatch(value) is not None and value not in RESERVED_HOST_IDS


def is_model_name(value: str) -> bool:
    return _MODEL_NAME.fullmatch(value) is not None


def is_prefix(value: str) -> bool:
    return _PREFIX.fullmatch(value) is not None


def sanitize_host_id(raw: str) -> str:
    """Turn a hostname such as ``GPU-Box.local`` into a valid host id (``gpu-box``)."""
    first_label = raw.split(".", 1)[0].lower()
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", first_label).strip("-")[:64]
    return cleaned if is_host_id(cleaned) else "host"


def all_hosts_filter(prefix: str) -> str:
    """Everything every agent under ``prefix`` publishes (what the TUI watches)."""
    return f"{prefix}/+/#"


@dataclass(frozen=True, slots=True)
class HostTopics:
    """Every topic of one host, so no module spells a topic string by hand."""

    prefix: str
    host: str

    def __post_init__(self) -> None:
        if not is_prefix(self.prefix):
            raise ValueError(f"invalid topic prefix {self.prefix!r}: use levels of [A-Za-z0-9._-]")
        if not is_host_id(self.host):
            raise ValueError(f"invalid host id {self.host!r}: use 1-64 of [a-z0-9_-], not 'reply'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.host}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def info(self) -> str:
        return f"{self.base}/info"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def weights(self) -> str:
        return f"{self.base}/weights"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def gpu(self, index: int) -> str:
        return f"{self.base}/gpu/{index}"

    def model(self, name: str) -> str:
        if not is_model_name(name):
            raise ValueError(f"invalid model name {name!r}")
        return f"{self.base}/models/{name}"

    def job(self, job_id: str) -> str:
        return f"{self.base}/jobs/{job_id}"

    def command(self, command: CommandName | str) -> str:
        return f"{self.base}/cmd/{command}"

    def reply(self, name: CommandName | str) -> str:
        """``P/H/reply/<name>``: the default reply topic of a command, or a client's own
        response topic (``tui-<random>``) for commands to this host."""
        return f"{self.base}/reply/{name}"

    def reply_root(self, command: CommandName | str) -> str:
        """Where the replies to ``command`` may go, ending in ``/``: ``P/H/reply/private/``
        for a private command (``logs``), ``P/H/reply/`` for every other."""
        if command in PRIVATE_COMMANDS:
            return f"{self.base}/reply/{PRIVATE_REPLY_LEVEL}/"
        return f"{self.base}/reply/"

    def default_reply(self, command: CommandName | str) -> str:
        """Where the reply to ``command`` goes without a response topic:
        ``P/H/reply/<command>``, or ``P/H/reply/private/<command>`` for a private one."""
        return self.reply_root(command) + command

    def client_reply(self, command: CommandName | str, client: str) -> str:
        """The response topic a client named ``client`` gives ``command``."""
        return self.reply_root(command) + client

    @property
    def command_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def admin_command(self, command: CommandName | str) -> str:
        """Where an admin's commands go: only the admin role may write there (mosquitto/acl),
        so a command there may do what only an admin may (a catalog entry that runs any
        command line or image)."""
        return f"{self.base}/admin/cmd/{command}"

    @property
    def admin_command_filter(self) -> str:
        return f"{self.base}/admin/cmd/+"

    @property
    def reply_filter(self) -> str:
        return f"{self.base}/reply/#"

    @property
    def everything_filter(self) -> str:
        return f"{self.base}/#"

    @property
    def device_id(self) -> str:
        """``modelbus_gpu1``: Home Assistant's id for this host; what HA ids cannot
        hold (``/``, ``.``) becomes ``_``."""
        return re.sub(r"[^a-zA-Z0-9_-]", "_", f"{self.prefix}_{self.host}")

    def discovery_config(self, discovery_prefix: str = "homeassistant") -> str:
        return f"{discovery_prefix}/device/{self.device_id}/config"

    def is_allowed_response_topic(self, topic: str) -> bool:
        """MQTT 5 response topics must stay inside this host's ``P/H/reply/#``: nobody
        can use the agent to write anywhere else, and since only this host's account may
        write there (mosquitto/acl), a reply there cannot have come from another agent."""
        if not topic or any(c in topic for c in "+#\x00") or len(topic) > 512:
            return False
        if "//" in topic or topic.endswith("/"):
            return False
        root = f"{self.base}/reply/"
        return topic.startswith(root) and len(topic) > len(root)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic under a prefix, split into host, kind (``gpu``, ``models``...) and argument."""

    host: str
    kind: str
    argument: str | None


def parse_topic(prefix: str, topic: str) -> ParsedTopic | None:
    """Split ``P/H/kind[/arg]``; None for topics that are not modelbus topics."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) < 2 or not is_host_id(parts[0]) or not parts[1]:
        return None
    if len(parts) > 3:
        return None
    return ParsedTopic(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

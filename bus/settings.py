"""Where the broker is and how to log in: the ``broker`` section that the agent, the
terminal UI and the command-line client read alike, from the same YAML file, the same
``MODELBUS_BROKER*`` environment variables and the same flags.

Precedence, lowest first: built-in defaults, the YAML file, the environment, flags.
Every error names the file and the field. The helpers that read and layer a file are
shared with the agent's own configuration (agent/config.py), which adds its sections.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.commands import describe_validation_error
from shared.topics import DEFAULT_PREFIX, is_prefix

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the source and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    url: str = DEFAULT_BROKER_URL
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(
        default=None,
        description="fixed MQTT client id; default modelbus-agent-<host_id>-<token derived "
        "from the password or TLS key> (see docs/broker.md)",
    )
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(
        default=3600, ge=0, description="how long the broker keeps commands for an absent agent"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = Field(default=False, description="skip hostname checks (testing only)")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("broker url must look like mqtt://[user:pass@]host[:port] or mqtts://")
        if not parts.hostname:
            raise ValueError("broker url has no host name")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("broker url has an invalid port") from None
        return url

    @model_validator(mode="after")
    def _backoff_order(self) -> BrokerConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """User and password: explicit fields win over those in the URL."""
        parts = urlsplit(self.url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        password = self.password or (unquote(parts.password) if parts.password else None)
        return user, password

    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        user, _ = self.credentials
        who = f"{user}@" if user else ""
        return f"{parts.scheme}://{who}{self.host}:{self.port}"


class BusConfig(BaseModel):
    """What a client of the bus reads from a configuration file: the topic prefix and
    the broker. Other sections (an agent's catalog, say) are not its business."""

    model_config = ConfigDict(extra="ignore")

    prefix: str = DEFAULT_PREFIX
    broker: BrokerConfig = Field(default_factory=BrokerConfig)

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not is_prefix(value):
            raise ValueError("prefix must be topic levels of [A-Za-z0-9._-], without wildcards")
        return value


# Environment variable -> dotted field path, for everything that connects to the bus.
BUS_ENV_OVERRIDES: Mapping[str, str] = {
    "MODELBUS_BROKER": "broker.url",
    "MODELBUS_BROKER_USERNAME": "broker.username",
    "MODELBUS_BROKER_PASSWORD": "broker.password",
    "MODELBUS_BROKER_CA_FILE": "broker.ca_file",
    "MODELBUS_PREFIX": "prefix",
}


def load_bus_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BusConfig:
    """The prefix and broker settings from the file, the environment and flags."""
    return load_layered(BusConfig, path, BUS_ENV_OVERRIDES, environ, overrides)


Config = TypeVar("Config", bound=BaseModel)


def load_layered(
    model: type[Config],
    path: Path | None,
    env_overrides: Mapping[str, str],
    environ: Mapping[str, str] | None,
    overrides: Mapping[str, Any] | None,
) -> Config:
    """``model`` from the file, the environment and the flags (see ``layered``); a bad
    value is a ConfigError naming the file and the field."""
    raw = layered(path, env_overrides, environ, overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        where = str(path) if path is not None else "configuration"
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def layered(
    path: Path | None,
    env_overrides: Mapping[str, str],
    environ: Mapping[str, str] | None,
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The file's settings with the environment's and then the flags' laid over them
    (dotted paths such as ``broker.url``; None values are ignored)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    env = os.environ if environ is None else environ
    layers = [
        {env_overrides[k]: v for k, v in env.items() if k in env_overrides},
        dict(overrides or {}),
    ]
    for values in layers:
        for dotted, value in values.items():
            if value is not None:
                set_dotted(raw, dotted, value)
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value

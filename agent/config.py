"""The agent's configuration: one YAML file, validated, with environment overrides.

Precedence, lowest first: built-in defaults, the YAML file, ``MODELBUS_*``
environment variables, command-line flags. Every error names the file and the
field, so a typo never turns into a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.alerts import AlertsConfig
from agent.catalog import Catalog, ModelSpec, check_names
from agent.gateway.keys import ApiKey, parse_env_keys
from agent.presets import PresetError, PresetName, PresetSettings, expand_entries
from bus.settings import BUS_ENV_OVERRIDES, BrokerConfig, load_layered
from shared.topics import DEFAULT_PREFIX, is_host_id, is_prefix, sanitize_host_id


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def agent_client_id(host_id: str, broker: BrokerConfig) -> str:
    """The agent's default client id, ``modelbus-agent-<host>-<token>``.

    A broker gives a client id to whoever connects with it last, whatever the account,
    and Mosquitto cannot reserve one for an account (see docs/broker.md). So the id
    carries a token derived from the agent's own secret (its password, or its TLS key):
    only a holder of that secret can take the agent's session. It stays the same across
    restarts, so the broker keeps commands for an agent that is briefly away. Without
    a secret (an open broker, where anyone may do anything) it is ``modelbus-agent-<host>``.
    """
    user, password = broker.credentials
    secret = password.encode() if password else _read_secret(broker.key_file)
    if not secret:
        return f"modelbus-agent-{host_id}"
    message = f"modelbus-agent\0{user or ''}\0{host_id}".encode()
    token = hmac.new(secret, message, hashlib.sha256).hexdigest()[:24]
    return f"modelbus-agent-{host_id}-{token}"


def _read_secret(path: Path | None) -> bytes:
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError:
        return b""  # the TLS connection will say what is wrong with the file


class TelemetryConfig(Strict):
    interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="every GPU is republished at least this often"
    )
    publish_on_change: bool = Field(
        default=True, description="publish at once when memory use or processes change"
    )
    watch_interval_s: float = Field(
        default=0.1,
        ge=0.01,
        le=10,
        description="how often backends without change notifications (NVML) are polled",
    )
    change_coalesce_s: float = Field(
        default=0.02, ge=0, le=5, description="least time between two change-driven publishes"
    )
    sample_timeout_s: float = Field(default=5.0, gt=0)


class SimGpuConfig(Strict):
    name: str = "Simulated GPU"
    memory_total_mb: int = Field(default=32768, gt=0)
    foreign_mb: int = Field(default=0, ge=0)
    power_limit_w: float = Field(default=450.0, gt=0)


class SimConfig(Strict):
    state_file: Path | None = Field(
        default=None, description="shared simulator state; default <state_dir>/sim-gpus.bin"
    )
    release_delay_s: float = Field(default=0.5, ge=0)
    gpus: list[SimGpuConfig] = Field(default_factory=lambda: [SimGpuConfig()], min_length=1)


class GpuConfig(Strict):
    backend: Literal["nvml", "sim"] = "nvml"
    sim: SimConfig = Field(default_factory=SimConfig)


class LifecycleConfig(Strict):
    queue_limit: int = Field(default=32, ge=1, le=10000, description="queued swap jobs at most")
    headroom_mb: int = Field(default=0, ge=0, description="keep this much free beyond a model")
    vram_poll_s: float = Field(default=0.05, gt=0, le=1, description="waiting for VRAM")
    vram_wait_timeout_s: float = Field(
        default=30.0, gt=0, description="how long freed memory may take to come back"
    )
    health_poll_s: float = Field(default=0.01, gt=0, le=5, description="while a model loads")
    stop_settle_s: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="fixed wait after stopping a server, for drivers that report memory "
        "free before it is usable (0: rely on the measured memory alone)",
    )
    monitor_interval_s: float = Field(
        default=1.0, gt=0, description="how often ready models are checked (crash, ttl)"
    )
    health_failures: int = Field(
        default=3, ge=1, description="failed health checks in a row that count as a crash"
    )
    job_retention_s: float = Field(
        default=300.0, ge=0, description="finished jobs stay retained this long"
    )
    preload: list[str] = Field(default_factory=list, description="models to load at start")
    sleep: bool = Field(
        default=True,
        description="evicted models whose server can sleep (catalog 'sleep') are put to "
        "sleep instead of stopped, while host RAM allows",
    )
    host_ram_mb: int | None = Field(
        default=None,
        gt=0,
        description="host RAM sleeping models may hold together; null: half of this "
        "machine's memory",
    )


class WeightsConfig(Strict):
    dir: Path | None = Field(
        default=None, description="where weights are installed; default <state_dir>/weights"
    )
    token: str | None = Field(
        default=None, description="Hugging Face token for gated and private repos (or HF_TOKEN)"
    )
    endpoint: str | None = Field(
        default=None, description="the hub's URL (or HF_ENDPOINT); default huggingface.co"
    )
    allow: list[str] = Field(
        default_factory=list,
        description="repos that may be installed: 'org/name' or 'org/*'; empty allows any",
    )
    queue_limit: int = Field(
        default=8, ge=1, le=1000, description="queued installs at most (one downloads at a time)"
    )
    disk_reserve_mb: int = Field(
        default=1024, ge=0, description="free disk an install must leave behind"
    )
    progress_interval_s: float = Field(
        default=0.5, gt=0, le=1, description="how often a download's progress is published"
    )
    resolve_timeout_s: float = Field(
        default=60.0, gt=0, description="how long listing a repo on the hub may take"
    )

    @field_validator("allow")
    @classmethod
    def _repo_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            org, _, name = pattern.partition("/")
            if not org or "*" in org or (name and "*" in name and name != "*"):
                raise ValueError(f"allow entry {pattern!r} must be 'org/name', 'org/*' or 'name'")
        return patterns


class HomeAssistantConfig(Strict):
    enabled: bool = Field(
        default=True, description="publish MQTT discovery; false removes what was published"
    )
    discovery_prefix: str = Field(
        default="homeassistant", description="Home Assistant's discovery prefix"
    )
    republish_delay_max_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="after Home Assistant announces 'online', republish within a random "
        "delay up to this, so a fleet does not answer at once",
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _plain_levels(cls, value: str) -> str:
        if not is_prefix(value):
            raise ValueError("must be topic levels of [A-Za-z0-9._-], without wildcards")
        return value


# A port model servers do not take by default (vLLM 8000, llama.cpp 8080, Ollama 11434).
DEFAULT_HTTP_PORT = 9470
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class HttpConfig(Strict):
    listen: str | None = Field(
        default=f"127.0.0.1:{DEFAULT_HTTP_PORT}",
        description="host:port of the gateway ([::1]:port for IPv6); null (or 'off') turns "
        "HTTP off; beyond loopback it needs api_keys",
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="name, role and key of each tool (or MODELBUS_HTTP_API_KEYS "
        "'name:role:key,...'); none: loopback callers may do what an operator may",
    )
    max_body_mb: int = Field(default=64, ge=1, le=4096, description="largest request body")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="connecting to a model server")
    queue_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="how long a request may wait for its model to load or for a free slot",
    )
    metrics_open: bool = Field(
        default=True,
        description="/metrics answers without a key (as Prometheus scrapes by default); "
        "false: it needs a viewer key",
    )
    compat_open_read: bool = Field(
        default=False,
        description="the original orchestrators' read routes (/models/status, /status, "
        "/weights, ...) answer callers on this machine without a key",
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none", "null"):
            return None
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            listen_address(value)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _from_environment(cls, value: Any) -> Any:
        return parse_env_keys(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> HttpConfig:
        if self.listen is not None and not self.api_keys:
            host, _ = listen_address(self.listen)
            if host not in _LOOPBACK:
                raise ValueError(
                    f"http.listen {self.listen!r} reaches beyond this machine: set "
                    "http.api_keys (or MODELBUS_HTTP_API_KEYS), or listen on 127.0.0.1"
                )
        names = [key.name for key in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("http.api_keys: each key needs a name of its own")
        return self


class GatewayConfig(Strict):
    """How the gateway orders the switches its requests ask for (docs/gateway.md)."""

    max_wait_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="longest a request waits before its switch evicts a model in use; "
        "0 queues every switch at once (arrival order)",
    )
    idle_after_s: float = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="a loaded model with no request for this long may be evicted at once",
    )


def listen_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as (host, port); ValueError naming what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be host:port, such as 127.0.0.1:{DEFAULT_HTTP_PORT}")
    return host, int(port)


class AgentConfig(Strict):
    host_id: str = Field(default_factory=lambda: sanitize_host_id(socket.gethostname()))
    prefix: str = DEFAULT_PREFIX
    state_dir: Path = Field(default_factory=lambda: _default_state_dir())
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    presets: dict[PresetName, PresetSettings] = Field(
        default_factory=dict,
        description="where each preset's server lives on this host and what every model of "
        "it gets (docs/configuration.md#presets)",
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _expand_presets(cls, data: Any) -> Any:
        """Entries with ``preset:`` become the full entries they stand for (presets.py),
        with the host's ``presets:`` settings and weights directory."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        models: dict[str, Any] = data["models"]
        if not any(isinstance(e, dict) and e.get("preset") is not None for e in models.values()):
            return data
        settings = PresetsSection.model_validate({"presets": data.get("presets") or {}}).presets
        try:
            expanded = expand_entries(models, settings, raw_weights_dir(data))
        except PresetError as error:
            raise ValueError(str(error)) from None
        return {**data, "models": expanded}

    @field_validator("models", mode="before")
    @classmethod
    def _name_models(cls, value: Any) -> Any:
        """In YAML a model is keyed by its name; the spec carries it too."""
        if isinstance(value, dict):
            return {
                name: ({"name": name, **spec} if isinstance(spec, dict) else spec)
                for name, spec in value.items()
            }
        return value

    @model_validator(mode="after")
    def _preload_in_catalog(self) -> AgentConfig:
        unknown = [name for name in self.lifecycle.preload if name not in self.models]
        if unknown:
            raise ValueError(f"lifecycle.preload names models not in the catalog: {unknown}")
        for name, spec in self.models.items():
            if spec.name != name:
                raise ValueError(f"models.{name}: name {spec.name!r} differs from its key")
        check_names(self.models)
        return self

    @property
    def catalog(self) -> Catalog:
        return Catalog(models=self.models)

    @field_validator("host_id")
    @classmethod
    def _valid_host_id(cls, value: str) -> str:
        if not is_host_id(value):
            raise ValueError("host_id must be 1-64 of [a-z0-9_-] (and not 'reply')")
        return value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not is_prefix(value):
            raise ValueError("prefix must be topic levels of [A-Za-z0-9._-], without wildcards")
        return value

    @property
    def client_id(self) -> str:
        return self.broker.client_id or agent_client_id(self.host_id, self.broker)

    @property
    def weights_dir(self) -> Path:
        return self.weights.dir or self.state_dir / "weights"

    @property
    def sim_state_file(self) -> Path:
        return self.gpu.sim.state_file or self.state_dir / "sim-gpus.bin"


class PresetsSection(Strict):
    presets: dict[PresetName, PresetSettings] = Field(default_factory=dict)


def raw_weights_dir(data: Mapping[str, Any]) -> Path:
    """The weights directory a configuration not yet validated names (or its default)."""
    weights = data.get("weights")
    configured = weights.get("dir") if isinstance(weights, dict) else None
    if configured:
        return Path(str(configured))
    return Path(str(data.get("state_dir") or _default_state_dir())) / "weights"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelbus"


# Environment variable -> dotted field path. Environment beats the file.
ENV_OVERRIDES: Mapping[str, str] = {
    **BUS_ENV_OVERRIDES,
    "MODELBUS_HOST_ID": "host_id",
    "MODELBUS_STATE_DIR": "state_dir",
    "MODELBUS_LOG_LEVEL": "log_level",
    "MODELBUS_GPU_BACKEND": "gpu.backend",
    "MODELBUS_TELEMETRY_INTERVAL": "telemetry.interval_s",
    "MODELBUS_WEIGHTS_DIR": "weights.dir",
    "MODELBUS_HTTP_LISTEN": "http.listen",
    "MODELBUS_HTTP_API_KEYS": "http.api_keys",
    # The names huggingface_hub itself reads.
    "HF_TOKEN": "weights.token",
    "HF_ENDPOINT": "weights.endpoint",
}


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the configuration from the file, the environment and explicit overrides
    (dotted paths such as ``broker.url``; None values are ignored)."""
    return load_layered(AgentConfig, path, ENV_OVERRIDES, environ, overrides)

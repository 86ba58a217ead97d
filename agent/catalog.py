"""The model catalog: which model servers this host can run and how.

It lives under ``models:`` in the agent's YAML. Names are slugs (they appear in
topics); the Hugging Face repo id, if any, lives in ``hf_repo``. Errors name the
model and the field (``models.qwen3-vl-30b.vram_mb: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.presets import PresetName, SleepApi
from shared.topics import is_model_name

MACRO = re.compile(r"\$\{(PORT|MODEL|GPUS|HOST)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessLaunch(_Strict):
    """Start a local process (no shell): ``argv`` with ``${PORT}``/``${MODEL}`` macros."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None


class DockerLaunch(_Strict):
    """Start an existing container by name, or create a labelled one from an image."""

    container: str | None = Field(default=None, description="an existing container to start/stop")
    image: str | None = None
    command: list[str] | None = None
    volumes: dict[str, str] = Field(
        default_factory=dict, description="host path -> container path[:ro]"
    )
    env: dict[str, str] = Field(default_factory=dict)
    ports: dict[int, int] = Field(
        default_factory=dict, description="container port -> host port; default PORT -> PORT"
    )
    gpu_device_request: bool = Field(
        default=True, description="ask Docker for the model's GPUs (NVIDIA container toolkit)"
    )
    network_mode: str | None = None
    bind: str | None = Field(
        default=None,
        description="the host address its ports are published on; default: every address",
    )

    @model_validator(mode="after")
    def _container_or_image(self) -> DockerLaunch:
        if (self.container is None) == (self.image is None):
            raise ValueError("give either 'container' (an existing one) or 'image', not both")
        return self


StopSignal = Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGKILL"]


class ModelSpec(_Strict):
    name: str
    runtime: Literal["process", "docker"] = "process"
    preset: PresetName | None = Field(
        default=None, description="the server it is (agent/presets.py), which filled the rest"
    )
    process: ProcessLaunch | None = None
    docker: DockerLaunch | None = None
    port: int = Field(ge=1, le=65535, description="where the server listens (${PORT})")
    health_url: str = "http://127.0.0.1:${PORT}/health"
    gpus: list[int] = Field(default_factory=lambda: [0], min_length=1)
    vram_mb: int = Field(gt=0, description="estimate until a load has measured the real use")
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher is evicted later")
    pinned: bool = Field(default=False, description="never evicted to make room")
    ttl_s: float | None = Field(default=None, gt=0, description="unload after this idle time")
    load_timeout_s: float = Field(default=300.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0)
    restart: Literal["never", "on-crash"] = "never"
    hf_repo: str | None = None
    weights: str | None = Field(
        default=None, description="the name of installed weights this model serves"
    )
    model_path: str | None = Field(
        default=None, description="a file or directory a preset server serves"
    )
    description: str | None = None
    stop_signal: StopSignal = Field(default="SIGTERM", description="what asks the server to stop")
    sleep: SleepApi | None = Field(
        default=None,
        description="the API that puts the server to sleep (frees its VRAM, keeps it warm "
        "in host RAM) and wakes it: vllm or sglang; null: it is stopped instead",
    )
    sleep_level: Literal[1, 2] = Field(
        default=1,
        description="vLLM's sleep level: 1 keeps the weights in host RAM, 2 discards them "
        "(no RAM held; waking reloads them)",
    )
    sleep_ram_mb: int | None = Field(
        default=None,
        ge=0,
        description="host RAM it holds asleep, until a sleep measures it; null: its vram_mb "
        "at sleep level 1, nothing at level 2",
    )
    # The gateway (docs/gateway.md).
    aliases: list[str] = Field(
        default_factory=list, description="other names a request's 'model' may use for it"
    )
    upstream_model: str | None = Field(
        default=None, description="the 'model' sent to the server (default: as requested)"
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="how long one forwarded request may take"
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="requests forwarded at once; null: no limit"
    )
    max_queued: int = Field(
        default=64, ge=0, description="requests waiting for it (to load, or for a slot)"
    )
    exclusive: bool = Field(
        default=False, description="keeps its GPUs to itself: nothing loads beside it"
    )
    drain_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="how long a switch that must evict it waits for its requests to end",
    )

    @field_validator("aliases")
    @classmethod
    def _plain_aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not 0 < len(alias) <= 256 or any(ord(c) < 32 for c in alias):
                raise ValueError("aliases are 1-256 printable characters")
        if len(set(value)) != len(value):
            raise ValueError("aliases must be distinct")
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not is_model_name(value):
            raise ValueError("model names are 1-64 of [A-Za-z0-9._-] (no '/')")
        return value

    @field_validator("health_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith("http://"):
            raise ValueError("health_url must be an http:// URL (macros like ${PORT} allowed)")
        return value

    @field_validator("gpus")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("gpus must be distinct GPU indexes")
        return value

    @model_validator(mode="after")
    def _launch_matches_runtime(self) -> ModelSpec:
        if self.runtime == "process" and self.process is None:
            raise ValueError("runtime 'process' needs a 'process:' block with argv")
        if self.runtime == "docker" and self.docker is None:
            raise ValueError("runtime 'docker' needs a 'docker:' block")
        if self.runtime == "process" and self.docker is not None:
            raise ValueError("runtime 'process' cannot have a 'docker:' block")
        if self.runtime == "docker" and self.process is not None:
            raise ValueError("runtime 'docker' cannot have a 'process:' block")
        return self

    def expand(self, text: str) -> str:
        """Replace ``${PORT}``, ``${MODEL}``, ``${GPUS}`` and ``${HOST}`` in one string."""
        values = {
            "PORT": str(self.port),
            "MODEL": self.name,
            "GPUS": ",".join(map(str, self.gpus)),
            "HOST": "127.0.0.1",
        }
        return MACRO.sub(lambda m: values[m.group(1)], text)

    @property
    def health(self) -> str:
        return self.expand(self.health_url)


# /v1/models/status and /v1/models/switch (the smart-switching router's) win over
# /v1/models/{id}: a model with one of these names could not be described there.
ROUTE_NAMES = frozenset({"status", "switch"})


class Catalog(_Strict):
    """All models, by name."""

    models: dict[str, ModelSpec] = Field(default_factory=dict)

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def names(self) -> list[str]:
        return sorted(self.models)

    @model_validator(mode="after")
    def _one_model_per_name(self) -> Catalog:
        check_names(self.models)
        return self

    def resolve(self, requested: str) -> ModelSpec | None:
        """The model a request names, by its name or one of its aliases."""
        spec = self.models.get(requested)
        if spec is not None:
            return spec
        return next((s for s in self.models.values() if requested in s.aliases), None)


def check_names(models: Mapping[str, ModelSpec]) -> None:
    """Every name a request may use (model names and aliases) names one model only, and
    none is taken by a static route beside ``/v1/models/{id}``."""
    owners: dict[str, str] = {name: name for name in models}
    for name, spec in models.items():
        for taken in {name, *spec.aliases} & ROUTE_NAMES:
            raise ValueError(
                f"models.{name}: {taken!r} cannot name a model: GET /v1/models/{taken} is "
                "a route of its own (docs/http.md); call the model otherwise"
            )
        for alias in spec.aliases:
            other = owners.setdefault(alias, name)
            if other != name:
                raise ValueError(f"models.{name}.aliases: {alias!r} already names model {other!r}")

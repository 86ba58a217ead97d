"""API keys and the roles they carry, the same as on the broker (docs/broker.md):
``viewer`` reads, ``user`` also sends inference requests (which may load catalog models),
``operator`` runs every command, ``admin`` also changes what the agent may execute.
Pure: no I/O. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.topics import CommandName

# The environment's form: "name:role:key" entries separated by commas.
ENV_SEPARATOR = ","
MIN_KEY_CHARS = 16


class Role(IntEnum):
    """Ordered: each role may do what the ones below it may."""

    VIEWER = 1
    USER = 2
    OPERATOR = 3
    ADMIN = 4

    @classmethod
    def named(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"role {name!r} is not one of {', '.join(r.name.lower() for r in cls)}"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


# The commands that only read what every viewer may see; the others (logs included: a
# server's output can hold secrets) are an operator's, as on the broker.
VIEWER_COMMANDS = frozenset({CommandName.STATUS, CommandName.HISTORY})


def command_role(command: CommandName) -> Role:
    """The role a bus command needs over HTTP."""
    return Role.VIEWER if command in VIEWER_COMMANDS else Role.OPERATOR


class ApiKey(BaseModel):
    """One key, for one tool (n8n, a script, Grafana): its name shows in logs, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    role: str = Field(description="viewer, user, operator or admin")
    key: str = Field(min_length=MIN_KEY_CHARS, repr=False)

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        return Role.named(value).label

    @property
    def grants(self) -> Role:
        return Role.named(self.role)


def parse_env_keys(text: str) -> list[dict[str, str]]:
    """``MODELBUS_HTTP_API_KEYS``: ``name:role:key,name:role:key``."""
    entries = []
    for part in (p.strip() for p in text.split(ENV_SEPARATOR)):
        if not part:
            continue
        name, role, key = [*part.split(":", 2), "", ""][:3]
        if not key:
            raise ValueError("each entry of MODELBUS_HTTP_API_KEYS is name:role:key")
        entries.append({"name": name, "role": role, "key": key})
    return entries


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the key's name (``anonymous`` where no keys are set) and role."""

    name: str
    role: Role


class Keys:
    """Finds the caller of a request from its headers (``Authorization: Bearer <key>``
    or ``X-API-Key: <key>``). Without any keys configured every caller is ``anonymous``
    with ``open_role`` (the server then listens on loopback only)."""

    def __init__(self, keys: Sequence[ApiKey], open_role: Role = Role.OPERATOR) -> None:
        self._keys = [(key.key.encode(), Caller(key.name, key.grants)) for key in keys]
        self._open = Caller("anonymous", open_role)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def caller(self, headers: Mapping[str, str]) -> Caller | None:
        """The caller, or None for a missing or unknown key (when keys are required)."""
        if not self._keys:
            return self._open
        presented = _presented(headers)
        if presented is None:
            return None
        found = None
        for key, caller in self._keys:
            # Every key is compared, so the time taken says nothing about which matched.
            if hmac.compare_digest(key, presented) and found is None:
                found = caller
        return found


def _presented(headers: Mapping[str, str]) -> bytes | None:
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode()
    api_key = headers.get("X-API-Key", "").strip()
    return api_key.encode() if api_key else None

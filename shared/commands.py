"""Command payloads and the one codec that reads them.

A command arrives on ``P/H/cmd/<command>`` as a JSON object, or as bare text
that is the command's main argument (``mosquitto_pub ... -m qwen3-vl-30b``).
Everything that can go wrong becomes a ``CommandError`` with a code from the
contract and one sentence naming what was wrong.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from shared.messages import ErrorCode
from shared.topics import JOB_ID_PATTERN, MODEL_NAME_PATTERN, CommandName

# Commands are small; anything bigger is a mistake or an attack.
MAX_COMMAND_BYTES = 16 * 1024
MAX_REQUEST_ID_CHARS = 128
# A refused payload is still read for its request id up to this size (the broker's limit).
MAX_REQUEST_ID_PEEK_BYTES = 256 * 1024

ModelName = Annotated[str, StringConstraints(pattern=f"^{MODEL_NAME_PATTERN}$")]
JobId = Annotated[str, StringConstraints(pattern=f"^{JOB_ID_PATTERN}$")]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]


# Hugging Face repo ids: "org/name" or "name", as the hub validates them.
def _no_double_separators(repo: str) -> str:
    if "--" in repo or ".." in repo:
        raise ValueError("repo ids may not contain '--' or '..'")
    return repo


RepoId = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
    ),
    AfterValidator(_no_double_separators),
]
GlobPattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# A logs reply's cursor, passed back as it came: opaque to clients, read by the agent.
LogCursorText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
LOG_LINES_DEFAULT = 200
LOG_LINES_MAX = 1000
HISTORY_LIMIT_DEFAULT = 20
# The agent keeps the last 100 loads of each model (agent/database.py).
HISTORY_LIMIT_MAX = 100
GpuIndex = Annotated[int, Field(ge=0, le=63)]


class CommandBase(BaseModel):
    # strict: "1" is not a GPU index and "yes" is not a boolean; say so instead of guessing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    command_name: ClassVar[CommandName]
    # The field that bare text fills; None for commands that take no argument.
    main_argument: ClassVar[str | None]

    request_id: RequestId | None = None


class LoadCommand(CommandBase):
    command_name = CommandName.LOAD
    main_argument = "model"
    model: ModelName
    gpu: GpuIndex | None = None
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    wait: bool = False


class UnloadCommand(CommandBase):
    command_name = CommandName.UNLOAD
    main_argument = "model"
    model: ModelName | None = None
    all: bool = Field(default=False, description="unload every loaded model (pinned need force)")
    force: bool = False
    wait: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> UnloadCommand:
        if (self.model is None) == (not self.all):
            raise ValueError("give either 'model' or 'all': true")
        if self.all and self.wait:
            raise ValueError("'wait' cannot be used with 'all' (one job per model)")
        return self


class _Placement(CommandBase):
    """A model to place, and what it may evict: a switch, or the plan of one."""

    main_argument = "model"
    model: ModelName
    gpu: GpuIndex | None = None
    exclusive: bool = False
    force: bool = Field(
        default=False,
        description="evict models of higher priority than the target too (never pinned ones)",
    )


class SwitchCommand(_Placement):
    command_name = CommandName.SWITCH
    wait: bool = False


class PlanCommand(_Placement):
    command_name = CommandName.PLAN


class InstallCommand(CommandBase):
    command_name = CommandName.INSTALL
    main_argument = "repo"
    repo: RepoId
    revision: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    include: list[GlobPattern] | None = Field(default=None, max_length=64)
    exclude: list[GlobPattern] | None = Field(default=None, max_length=64)
    name: ModelName | None = None
    wait: bool = False


class UninstallCommand(CommandBase):
    command_name = CommandName.UNINSTALL
    main_argument = "name"
    name: ModelName
    wait: bool = False


class CancelCommand(CommandBase):
    command_name = CommandName.CANCEL
    main_argument = "job_id"
    job_id: JobId
    wait: bool = Field(
        default=True,
        description="reply once the job has ended (its half-started server stopped); "
        "false replies at once, while a running job is still being cancelled",
    )


class StatusCommand(CommandBase):
    command_name = CommandName.STATUS
    main_argument = None


class LogsCommand(CommandBase):
    command_name = CommandName.LOGS
    main_argument = "model"
    model: ModelName
    lines: int = Field(
        default=LOG_LINES_DEFAULT,
        ge=1,
        le=LOG_LINES_MAX,
        description="at most this many lines: the last ones, or with since the first after it",
    )
    since: LogCursorText | None = Field(
        default=None,
        description="the cursor of an earlier logs reply: answer the lines after it",
    )


class HistoryCommand(CommandBase):
    command_name = CommandName.HISTORY
    main_argument = "model"
    model: ModelName | None = Field(default=None, description="one model; every model when absent")
    limit: int = Field(
        default=HISTORY_LIMIT_DEFAULT,
        ge=1,
        le=HISTORY_LIMIT_MAX,
        description="the newest loads of each model, at most",
    )


class CatalogCommand(CommandBase):
    """The agent's own catalog, beside its configuration file's ``models:``."""

    command_name = CommandName.CATALOG
    main_argument = "action"
    action: Literal["show", "add", "remove"] = "show"
    name: ModelName | None = Field(
        default=None, description="the model (add: default the weights' name)"
    )
    entry: dict[str, Any] | None = Field(
        default=None,
        description="add: a catalog entry as in the configuration's models: (a preset and "
        "installed weights; anything that decides what runs needs the admin topic)",
    )
    weights: ModelName | None = Field(
        default=None,
        description="add: installed weights; without 'entry', the entry their install "
        "suggested (a preset serving them); with 'entry', its 'weights'",
    )

    @model_validator(mode="after")
    def _what_to_add(self) -> CatalogCommand:
        if self.action == "add" and self.entry is None and self.weights is None:
            raise ValueError("add needs 'entry' or 'weights' (installed weights)")
        if self.action == "remove" and self.name is None:
            raise ValueError("remove needs 'name'")
        if self.action in ("show", "remove") and (self.entry or self.weights):
            raise ValueError(f"{self.action} takes no 'entry' or 'weights'")
        return self


COMMAND_MODELS: dict[CommandName, type[CommandBase]] = {
    model.command_name: model
    for model in (
        LoadCommand,
        UnloadCommand,
        SwitchCommand,
        PlanCommand,
        InstallCommand,
        UninstallCommand,
        CancelCommand,
        StatusCommand,
        LogsCommand,
        HistoryCommand,
        CatalogCommand,
    )
}


class CommandError(Exception):
    """A command that cannot be executed; becomes one error reply."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def decode_command(
    command: str, payload: bytes, *, max_bytes: int = MAX_COMMAND_BYTES
) -> CommandBase:
    """Read a command payload (JSON object or bare text) into its model."""
    try:
        name = CommandName(command)
    except ValueError:
        known = ", ".join(c.value for c in CommandName)
        raise CommandError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {command[:64]!r}: use one of {known}",
            request_id=request_id_of(payload),
        ) from None
    if len(payload) > max_bytes:
        raise CommandError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes; commands are limited to {max_bytes} bytes",
            request_id=request_id_of(payload),
        )
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError(ErrorCode.INVALID_PAYLOAD, "payload is not UTF-8 text") from None
    model = COMMAND_MODELS[name]
    fields = _fields_from_text(model, text)
    request_id = fields.get("request_id")
    echo = (
        request_id
        if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS
        else None
    )
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD, f"{name}: {describe_validation_error(exc)}", request_id=echo
        ) from None


def with_wait(command: CommandBase, wait: bool) -> CommandBase:
    """The command with its ``wait`` set, validated again (``unload all`` cannot wait)."""
    fields = {**command.model_dump(exclude_unset=True), "wait": wait}
    try:
        return type(command).model_validate(fields)
    except ValidationError as exc:
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD,
            f"{command.command_name}: {describe_validation_error(exc)}",
            request_id=command.request_id,
        ) from None


def request_id_of(payload: bytes) -> str | None:
    """The request id of a payload that holds a readable one, for the reply to a command
    refused before (or without) being read: a retained one, an unknown verb, one too big."""
    if len(payload) > MAX_REQUEST_ID_PEEK_BYTES:
        return None
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not text.startswith("{"):
        return None
    try:
        value = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError:
        return None
    request_id = value.get("request_id") if isinstance(value, dict) else None
    if isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        return request_id
    return None


def _fields_from_text(model: type[CommandBase], text: str) -> dict[str, Any]:
    if text.startswith("{"):
        # pydantic's own parser, not json.loads: it refuses what would later break the
        # agent (lone surrogates, which no reply could encode; nesting past 200 levels;
        # integers beyond 128 bits) with a message, instead of raising RecursionError or
        # hitting Python's limit on integer digits.
        try:
            value = pydantic_core.from_json(text, allow_inf_nan=False)
        except ValueError as exc:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD, f"payload looks like JSON but is not valid: {exc}"
            ) from None
        if not isinstance(value, dict):
            raise CommandError(ErrorCode.INVALID_PAYLOAD, "a JSON payload must be an object")
        return value
    if text.startswith(("[", '"')):
        # A JSON string or array is neither an object nor bare text: refuse it
        # rather than treating '"qwen"' (quotes included) as a model name.
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD,
            "payload must be a JSON object or bare text without quotes",
        )
    if not text:
        return {}
    if model.main_argument is None:
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD,
            f"{model.command_name} takes no argument; send an empty payload or a JSON object",
        )
    return {model.main_argument: text}


def describe_validation_error(exc: ValidationError) -> str:
    """One readable sentence for the first problems pydantic found, naming the fields."""
    parts = []
    for error in exc.errors()[:3]:
        field = ".".join(str(part) for part in error["loc"]) or "payload"
        if error["type"] == "value_error" and not error["loc"]:
            # A check of the whole payload: its own sentence names the fields.
            parts.append(str(error["msg"]).removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        elif error["type"] == "missing":
            parts.append(f"missing field {field!r}")
        else:
            parts.append(f"field {field!r}: {error['msg']}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)

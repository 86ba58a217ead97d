"""docs/protocol.md is the contract people read: its examples must be payloads the
models accept, and its tables must name only topics and codes the code knows."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from shared import commands, messages
from shared.commands import COMMAND_MODELS
from shared.messages import ErrorCode
from shared.schema import PUBLISHED
from shared.topics import CommandName

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MIN_EXAMPLES = 12
# Base classes: validating against them would check nothing.
ABSTRACT_MODELS = {"Published", "CommandBase"}

EXAMPLE_COMMENT = re.compile(r"^<!--\s*example:\s*(?P<name>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
BACKTICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Example:
    line: int
    name: str
    body: str | None  # None when the comment is not followed by a ```json block

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.name}"


def _doc_lines() -> list[str]:
    assert DOC.exists(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8").splitlines()


def _fenced_block(lines: list[str], start: int) -> tuple[str, str, int]:
    """The language, body and closing line index of the fence opening at ``start``."""
    lang = FENCE.match(lines[start])
    assert lang is not None
    for end in range(start + 1, len(lines)):
        if lines[end].strip() == "```":
            return lang["lang"], "\n".join(lines[start + 1 : end]), end
    raise AssertionError(f"{DOC.name}:{start + 1}: unclosed code fence")


def parse_examples() -> tuple[list[Example], list[int]]:
    """Every ``<!-- example: Name -->`` with the json block after it, and the
    line numbers of json blocks that no example comment names."""
    lines = _doc_lines()
    examples: list[Example] = []
    untagged: list[int] = []
    pending: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        comment = EXAMPLE_COMMENT.match(line)
        if comment:
            if pending is not None:
                examples.append(Example(pending[0], pending[1], None))
            pending = (index + 1, comment["name"])
        elif FENCE.match(line):
            lang, body, end = _fenced_block(lines, index)
            if lang == "json":
                if pending is None:
                    untagged.append(index + 1)
                else:
                    examples.append(Example(pending[0], pending[1], body))
            elif pending is not None:
                examples.append(Example(pending[0], pending[1], None))
            pending = None
            index = end
        elif line.strip() and pending is not None:
            # Only blank lines may separate the comment from its block.
            examples.append(Example(pending[0], pending[1], None))
            pending = None
        index += 1
    if pending is not None:
        examples.append(Example(pending[0], pending[1], None))
    return examples, untagged


def contract_models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for module in (messages, commands):
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value.__module__ == module.__name__
                and name not in ABSTRACT_MODELS
            ):
                found[name] = value
    for model in COMMAND_MODELS.values():
        found[model.__name__] = model
    return found


def unknown_keys(given: Any, dumped: Any, path: str = "") -> list[str]:
    """Keys in the example that the model dropped: published models ignore unknown
    fields, so a misspelt field would otherwise validate silently."""
    problems: list[str] = []
    if isinstance(given, dict) and isinstance(dumped, dict):
        for key, value in given.items():
            if key not in dumped:
                problems.append(path + key)
            else:
                problems += unknown_keys(value, dumped[key], f"{path}{key}.")
    elif isinstance(given, list) and isinstance(dumped, list):
        for position, (item, dumped_item) in enumerate(zip(given, dumped, strict=False)):
            problems += unknown_keys(item, dumped_item, f"{path}{position}.")
    return problems


def table_rows() -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(_doc_lines(), 1) if line.lstrip().startswith("|")]


EXAMPLES, UNTAGGED = parse_examples()


def test_enough_examples() -> None:
    assert len(EXAMPLES) >= MIN_EXAMPLES, (
        f"{DOC.name} has {len(EXAMPLES)} '<!-- example: Model -->' blocks; at least "
        f"{MIN_EXAMPLES} are required"
    )


def test_every_json_block_is_tagged_with_its_model() -> None:
    assert not UNTAGGED, (
        f"json blocks without a preceding '<!-- example: Model -->' at lines {UNTAGGED}"
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_validates_against_its_model(example: Example) -> None:
    where = f"{DOC.name}:{example.line}"
    models = contract_models()
    assert example.name in models, (
        f"{where}: no model {example.name!r} in shared.messages or shared.commands"
    )
    assert example.body is not None, f"{where}: the example comment is not followed by ```json"
    try:
        obj = json.loads(example.body)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{where}: example is not valid JSON: {exc}")
    model = models[example.name]
    try:
        instance = model.model_validate(obj)
    except ValidationError as exc:
        pytest.fail(f"{where}: example is not a valid {example.name}:\n{exc}")
    dropped = unknown_keys(obj, instance.model_dump(mode="json"))
    assert not dropped, f"{where}: fields {dropped} are not part of {example.name}"


def test_every_published_model_has_an_example() -> None:
    shown = {e.name for e in EXAMPLES}
    missing = sorted({m.__name__ for m in PUBLISHED.values()} - shown)
    assert not missing, f"{DOC.name} has no example of {missing}"


def test_every_command_model_has_an_example() -> None:
    shown = {e.name for e in EXAMPLES}
    missing = sorted({m.__name__ for m in COMMAND_MODELS.values()} - shown)
    assert not missing, f"{DOC.name} has no example of {missing}"


def test_command_topics_in_tables_name_real_commands() -> None:
    known = {c.value for c in CommandName}
    seen: set[str] = set()
    for number, row in table_rows():
        for token in BACKTICKED.findall(row):
            if "/cmd/" not in token:
                continue
            command = token.rsplit("/cmd/", 1)[1]
            assert command in known, (
                f"{DOC.name}:{number}: {token!r} names no command; known: {sorted(known)}"
            )
            seen.add(command)
    assert seen == known, f"commands without a P/H/cmd/<command> row: {sorted(known - seen)}"


def test_error_code_table_lists_every_code() -> None:
    tabled = {token for _, row in table_rows() for token in BACKTICKED.findall(row.split("|")[1])}
    missing = sorted(code.value for code in ErrorCode if code.value not in tabled)
    assert not missing, f"error codes missing from the table in {DOC.name}: {missing}"

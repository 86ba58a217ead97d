from __future__ import annotations

import json
from pathlib import Path

from modelbus.cli import main
from shared.schema import all_schemas, render

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"


def test_committed_schemas_match_the_models() -> None:
    for name, schema in all_schemas().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{name} missing: run 'modelbus schema'"
        assert path.read_text() == render(schema), f"{name} stale: run 'modelbus schema'"


def test_schema_command_writes_and_checks(tmp_path: Path) -> None:
    assert main(["schema", "--out", str(tmp_path), "--check"]) == 1
    assert main(["schema", "--out", str(tmp_path)]) == 0
    assert main(["schema", "--out", str(tmp_path), "--check"]) == 0
    load = json.loads((tmp_path / "cmd-load.schema.json").read_text())
    assert load["additionalProperties"] is False
    assert "model" in load["required"]

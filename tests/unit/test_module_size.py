"""No module of product code grows past 500 lines: past that, a module has stopped being
one concern (docs/architecture.md). The simulator and the tests may be longer."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("shared", "bus", "agent", "tui", "modelbus")
MAX_LINES = 500


def test_no_product_module_is_over_500_lines() -> None:
    modules = [path for package in PRODUCT for path in (ROOT / package).rglob("*.py")]
    assert len(modules) > 40  # the packages were found
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in modules
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}

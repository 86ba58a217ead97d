"""The screens in docs/tui.md are the TUI's snapshot tests' pictures, as text.

Each block in the document between ``<!-- screen: NAME -->`` and ``<!-- /screen -->`` is
the text of ``tests/tui/__snapshots__/test_snapshots/NAME.svg``, read cell by cell from
the positions of the SVG's text runs (a run's spaces are no-break spaces, which a plain
text extraction drops: that made labels look run together). A test holds the document
to the pictures; after ``pytest tests/tui --snapshot-update`` accepts new pictures,
rewrite the document's screens with::

    python -m devtools.tui_screens --write
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = REPO / "docs" / "tui.md"
SNAPSHOTS = REPO / "tests" / "tui" / "__snapshots__" / "test_snapshots"

# Rich's SVG export: one <text> per run of one style, placed by x (cells) and its line.
_RUN = re.compile(
    r'<text class="[^"]*-r\d+" x="(?P<x>[\d.]+)" y="[\d.]+" textLength="[\d.]+" '
    r'clip-path="url\(#[^)]*line-(?P<line>\d+)\)">(?P<text>[^<]*)</text>'
)
_BLOCK = re.compile(
    r"(<!-- screen: (?P<name>[\w-]+) -->\n```text\n)(?P<body>.*?)(```\n<!-- /screen -->)",
    re.DOTALL,
)
# Rich draws a cell 12.2 units wide, column 0 at x=0.
CELL = 12.2


def svg_text(svg: str) -> str:
    """The screen an SVG snapshot shows, as lines of text (trailing blanks dropped)."""
    lines: dict[int, dict[int, str]] = {}
    for run in _RUN.finditer(svg):
        column = round(float(run["x"]) / CELL)
        row = lines.setdefault(int(run["line"]), {})
        for offset, char in enumerate(html.unescape(run["text"]).replace("\xa0", " ")):
            row[column + offset] = char
    if not lines:
        return ""
    text = []
    for number in range(max(lines) + 1):
        row = lines.get(number, {})
        text.append("".join(row.get(i, " ") for i in range(max(row, default=-1) + 1)).rstrip())
    while text and not text[-1]:
        text.pop()
    return "\n".join(text) + "\n"


def screens(document: str) -> dict[str, str]:
    """The screens the document shows, by snapshot name."""
    return {block["name"]: block["body"] for block in _BLOCK.finditer(document)}


def rendered(document: str, snapshots: Path = SNAPSHOTS) -> str:
    """The document with every screen block replaced by its snapshot's text."""

    def replace(block: re.Match[str]) -> str:
        svg = (snapshots / f"{block['name']}.svg").read_text(encoding="utf-8")
        return block.group(1) + svg_text(svg) + block.group(4)

    return _BLOCK.sub(replace, document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/tui.md's screens")
    args = parser.parse_args(argv)
    document = DOCUMENT.read_text(encoding="utf-8")
    fresh = rendered(document)
    if args.write:
        DOCUMENT.write_text(fresh, encoding="utf-8")
        return 0
    if fresh != document:
        print("docs/tui.md's screens differ from the snapshots: run with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

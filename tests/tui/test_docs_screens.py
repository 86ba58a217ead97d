"""docs/tui.md shows the app's real screens: the snapshot tests' pictures, as text."""

from __future__ import annotations

from devtools.tui_screens import DOCUMENT, rendered, screens, svg_text

# The screens the document must show (the snapshot tests' names).
SHOWN = {"test_dashboard_80x24", "test_dashboard_160x48", "test_processes_80x24"}


def test_the_documents_screens_are_the_snapshots() -> None:
    document = DOCUMENT.read_text(encoding="utf-8")
    assert set(screens(document)) >= SHOWN
    assert rendered(document) == document, (
        "docs/tui.md's screens differ from the snapshot pictures: "
        "run python -m devtools.tui_screens --write"
    )


def test_runs_of_text_keep_their_spaces_and_places() -> None:
    """Rich starts a run with a no-break space where a label meets a figure; the text
    keeps it (a plain extraction had 'gpu137.1/63.7G')."""
    svg = "".join(
        f'<text class="terminal-r{i}" x="{x}" y="20" textLength="1" '
        f'clip-path="url(#terminal-line-{line})">{text}</text>'
        for i, (x, line, text) in enumerate(
            [
                (12.2, 0, "●&#160;"),
                (36.6, 0, "gpu1"),
                (85.4, 0, "&#160;37.1/63.7G"),
                (24.4, 2, "x"),
            ]
        )
    )
    assert svg_text(svg) == " ● gpu1 37.1/63.7G\n\n  x\n"

"""What the TUI last told the operator (a reply, a refusal, a hint), on one line above
the footer instead of a toast: toasts covered the jobs panel. Every sentence is kept,
newest first, for the ``e`` view."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text
from textual.widgets import Static

from tui.format import clock, printable

# The line until something is said.
HINT = "Enter shows the selected row in full; answers to your commands appear here."
# Kept for the ``e`` view.
MAX_SAID = 100
# Textual's notification severities, as the line draws them.
_LOOK = {
    "information": ("·", "green"),
    "warning": ("!", "bold yellow"),
    "error": ("✖", "bold red"),
}


@dataclass(frozen=True, slots=True)
class Said:
    at: datetime
    severity: str
    title: str
    message: str

    def line(self) -> Text:
        glyph, style = _LOOK.get(self.severity, ("·", ""))
        text = Text.assemble((f"{clock(self.at)} ", "dim"), (f"{glyph} ", style))
        if self.title:
            text.append(f"{self.title}: ", style="bold")
        text.append(" ".join(printable(self.message).split()), style=style if glyph != "·" else "")
        return text


class OutcomeLine(Static):
    DEFAULT_CSS = """
    OutcomeLine {
        height: 1; padding: 0 1; background: $panel;
        text-wrap: nowrap; text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(Text(HINT, style="dim"), id=id)
        self.said: deque[Said] = deque(maxlen=MAX_SAID)

    def say(self, said: Said) -> None:
        self.said.appendleft(said)
        self.update(said.line())


def render_said(said: list[Said]) -> Text:
    """The ``e`` view's part: what the TUI told the operator, newest first."""
    text = Text("Answers to your commands", style="bold")
    if not said:
        return text.append("\n  nothing yet\n", style="dim")
    text.append(f" ({len(said)}, newest first)\n")
    for item in said:
        text.append("  ").append_text(item.line()).append("\n")
    return text

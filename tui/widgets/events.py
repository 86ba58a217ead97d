"""The latest events of every host, newest first, with their severity."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

from shared.messages import Severity
from tui.format import clock
from tui.store import HostEvent

SEVERITY_LOOK: dict[Severity, tuple[str, str]] = {
    Severity.INFO: ("·", "dim"),
    Severity.WARNING: ("!", "bold yellow"),
    Severity.ERROR: ("✖", "bold red"),
    Severity.CRITICAL: ("✖", "bold reverse red"),
}


def render_events(events: Sequence[HostEvent], limit: int) -> Text:
    if not events:
        return Text("No events yet.", style="dim")
    lines = []
    for item in events[:limit]:
        glyph, style = SEVERITY_LOOK.get(item.event.severity, ("?", ""))
        lines.append(
            Text.assemble(
                (f"{clock(item.event.ts)} ", "dim"),
                (f"{glyph} {item.event.severity.value:<8}", style),
                (f" {item.host}: ", "bold"),
                item.event.message,
            )
        )
    return Text("\n").join(lines)


class EventsPanel(Widget):
    DEFAULT_CSS = """
    EventsPanel {
        height: 1fr; min-height: 3; padding: 0 1; border-top: hkey $secondary;
        text-wrap: nowrap; text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.events: Sequence[HostEvent] = ()

    def show(self, events: Sequence[HostEvent]) -> None:
        self.events = events
        self.refresh()

    def render(self) -> Text:
        return render_events(self.events, max(self.content_size.height, 1))

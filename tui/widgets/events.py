"""The latest events of every host, newest first, with their severity."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

from shared.messages import Severity
from tui.format import clock, printable
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
                printable(item.event.message),
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


def render_events_detail(events: Sequence[HostEvent]) -> Text:
    """``e``: every kept event in full, newest first, with what it concerns."""
    if not events:
        return Text("No events yet.", style="dim")
    text = Text("Events", style="bold")
    text.append(f" ({len(events)}, newest first)\n")
    for item in events:
        event = item.event
        glyph, style = SEVERITY_LOOK.get(event.severity, ("?", ""))
        text.append(f"\n{event.ts.isoformat(timespec='seconds')} ", style="dim")
        text.append(f"{glyph} {event.severity.value} ", style=style)
        text.append(f"{item.host} {event.event_type}\n", style="bold")
        text.append(f"  {printable(event.message)}\n")
        about = [
            f"{label} {value}"
            for label, value in (("model", event.model), ("gpu", event.gpu), ("job", event.job_id))
            if value is not None
        ]
        if about:
            text.append(f"  {', '.join(about)}\n", style="dim")
    return text

"""The header line (the broker link, the selected host, what needs a look) and what the
empty screen says before any host is on the bus. Pure: the app draws what these return."""

from __future__ import annotations

from rich.text import Text

from tui.bridge import Link, LinkState
from tui.store import HostView

# The header must fit 80 columns: a connected link is only its glyph.
_LINK_LOOK: dict[LinkState, tuple[str, str]] = {
    LinkState.CONNECTING: ("◌ connecting", "yellow"),
    LinkState.CONNECTED: ("●", "bold green"),
    LinkState.RECONNECTING: ("◌ reconnecting", "bold yellow"),
    LinkState.REFUSED: ("✖ refused by", "bold reverse red"),
}


def link_text(
    link: Link, views: list[HostView], selected: str | None, skipped: int, now: float
) -> Text:
    """The link (and why it is down), the selected host of how many and its requests per
    second, hosts offline, messages skipped."""
    words, style = _LINK_LOOK[link.state]
    text = Text.assemble((words, style), f" {link.broker}")
    if link.protocol:
        text.append(f" v{link.protocol}", style="dim")
    if link.state in (LinkState.CONNECTING, LinkState.RECONNECTING) and link.detail:
        text.append(f" │ {link.detail}", style="yellow")
    ids = [v.host_id for v in views]
    if selected in ids:
        text.append(" │ host ")
        text.append(selected, style="bold")
        if len(ids) > 1:
            text.append(f" {ids.index(selected) + 1}/{len(ids)} ([ ])", style="dim")
        rate = views[ids.index(selected)].requests_per_s(now)
        if rate > 0:
            text.append(f" │ {rate:.1f} req/s", style="cyan")
    offline = sum(1 for v in views if v.online is False)
    if offline:
        text.append(f" │ {offline} offline", style="bold yellow")
    if skipped:
        text.append(f" │ {skipped} skipped (d)", style="yellow")
    return text


def waiting_note(link: Link) -> str:
    """What the empty screen says: no broker (and how to get one), or no host yet."""
    if link.state is LinkState.CONNECTING and link.detail:
        return (
            f"No broker answers at {link.broker}: {link.detail}.\n"
            "Start Mosquitto (docs/broker.md), point --broker at yours, or run "
            "'modelbus demo' for a simulated GPU host with its own broker."
        )
    if link.state is LinkState.CONNECTED:
        return "Connected; waiting for a GPU host on the bus (no agent has published yet)…"
    return "Waiting for a GPU host on the bus…"

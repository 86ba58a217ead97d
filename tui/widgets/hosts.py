"""The list of hosts on the bus; offline ones greyed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.store import HostView

NAME_CELLS = 11


def _figure(mb: int) -> str:
    """GiB, whole above 100 so a fleet's labels stay one line."""
    return f"{mb / 1024:.0f}" if mb >= 100 * 1024 else f"{mb / 1024:.1f}"


def host_label(view: HostView) -> Text:
    name = view.host_id if len(view.host_id) <= NAME_CELLS else view.host_id[: NAME_CELLS - 1] + "…"
    if view.online is False:
        label = Text.assemble(("○ ", "dim"), (name, "dim strike"), (" offline", "dim"))
    else:
        glyph = ("● ", "bold green") if view.online else ("◌ ", "dim")
        label = Text.assemble(glyph, (name, "bold"))
        state = view.state
        if state is not None:
            label.append(f" {_figure(state.used_mb)}/{_figure(state.total_mb)}G")
            if state.active_job:
                label.append(" ⟳", style="yellow")
    label.no_wrap = True
    label.overflow = "ellipsis"
    return label


class HostList(OptionList):
    """Shown when the terminal is wide enough (see ModelbusApp.on_resize); narrower
    ones show one host at a time, chosen with ``[`` and ``]``."""

    DEFAULT_CSS = """
    HostList { width: 26; height: 1fr; display: none; border: none; border-right: vkey $secondary; }
    """

    def show(self, views: list[HostView], selected: str | None) -> None:
        ids = [view.host_id for view in views]
        current = [self.get_option_at_index(i).id for i in range(self.option_count)]
        labels = [host_label(view) for view in views]
        if current == ids:
            for i, label in enumerate(labels):
                self.replace_option_prompt_at_index(i, label)
        else:
            self.clear_options()
            self.add_options(
                [Option(label, id=hid) for hid, label in zip(ids, labels, strict=True)]
            )
        if selected in ids:
            self.highlighted = ids.index(selected)

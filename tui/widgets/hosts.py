"""The list of hosts on the bus; offline ones greyed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.format import gib
from tui.store import HostView


def host_label(view: HostView) -> Text:
    if view.online is False:
        return Text.assemble(("○ ", "dim"), (view.host_id, "dim strike"), (" offline", "dim"))
    glyph = Text("● ", style="bold green") if view.online else Text("◌ ", style="dim")
    label = glyph + Text(view.host_id, style="bold")
    state = view.state
    if state is not None:
        label.append(f" {gib(state.used_mb)[:-1]}/{gib(state.total_mb)}")
        if state.active_job:
            label.append(" ⟳", style="yellow")
    return label


class HostList(OptionList):
    DEFAULT_CSS = """
    HostList { width: 20; height: 1fr; border: none; border-right: vkey $secondary; }
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

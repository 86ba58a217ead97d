"""The footer: the keys, most used first, as many as the width holds, and always how to
see them all (``?``) and how to quit. Textual's footer cut the rest of the line off at
80 columns, ``d`` and ``e`` among them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

_GAP = " "


@dataclass(frozen=True, slots=True)
class Key:
    key: str
    label: str


def key_bar(keys: Sequence[Key], always: Sequence[Key], width: int) -> Text:
    """``keys`` in order while they fit beside ``always`` (drawn last, whatever the
    width); a key that does not fit is left out, not cut."""

    def cost(key: Key) -> int:
        return len(key.key) + 1 + len(key.label) + len(_GAP)

    room = width - sum(cost(key) for key in always)
    shown = []
    for key in keys:
        if cost(key) > room:
            continue
        shown.append(key)
        room -= cost(key)
    text = Text()
    for key in [*shown, *always]:
        text.append(key.key, style="bold reverse")
        text.append(f" {key.label}{_GAP}", style="dim")
    text.rstrip()
    return text


class KeyBar(Widget):
    DEFAULT_CSS = """
    KeyBar { height: 1; padding: 0 1; background: $panel; }
    """

    def __init__(self, keys: Sequence[Key], always: Sequence[Key], *, id: str | None = None):
        super().__init__(id=id)
        self.keys = keys
        self.always = always

    def render(self) -> Text:
        return key_bar(self.keys, self.always, self.content_size.width)

"""Modal questions (confirm, ask for a repo), the detail and debug views, and a model's
log followed live."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Log, Static

from shared.replies import LogLines
from tui.format import printable
from tui.store import BusStore

# Asks for the lines after a cursor (None: the last ones): the lines, or why none came.
LogFetch = Callable[[str | None], Awaitable[LogLines | str]]
# How often a followed log is asked for what it wrote since.
FOLLOW_INTERVAL_S = 1.0
# The log view keeps this many lines.
LOG_VIEW_LINES = 5000


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; ``y``/Enter confirm, ``n``/Escape decline."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 70; max-width: 95%; height: auto; border: thick $warning; padding: 1 2;
        background: $surface;
    }
    ConfirmScreen #question { margin-bottom: 1; }
    ConfirmScreen Horizontal { height: auto; align-horizontal: right; }
    ConfirmScreen Button { margin-left: 2; }
    """
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, title: str, question: str, *, yes: str = "Yes") -> None:
        super().__init__()
        self.title_text = title
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.title_text, style="bold"))
            yield Static(self.question, id="question")
            with Horizontal():
                yield Button(f"{self.yes} (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class AskScreen(ModalScreen[str | None]):
    """One line of input; Enter submits, Escape gives up."""

    DEFAULT_CSS = """
    AskScreen { align: center middle; }
    AskScreen > Vertical {
        width: 70; max-width: 95%; height: auto; border: thick $accent; padding: 1 2;
        background: $surface;
    }
    """
    BINDINGS = [Binding("escape", "give_up", "Cancel", id="ask.cancel")]

    def __init__(self, question: str, placeholder: str = "", *, value: str = "") -> None:
        super().__init__()
        self.question = question
        self.placeholder = placeholder
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            yield Input(self.value, placeholder=self.placeholder, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_give_up(self) -> None:
        self.dismiss(None)


class DetailScreen(ModalScreen[None]):
    """One thing in full (a job, the events): what the tables and panels cut."""

    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > VerticalScroll {
        width: 90%; height: 80%; border: thick $accent; padding: 0 1; background: $surface;
    }
    """
    BINDINGS = [Binding("escape,q,enter", "close", "Close", id="detail.close")]

    def __init__(self, body: Text, *, body_id: str = "detail") -> None:
        super().__init__()
        self.body = body
        self.body_id = body_id

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.body, id=self.body_id)

    def action_close(self) -> None:
        self.dismiss(None)

    def extend(self, more: Text) -> None:
        """Add to what is shown (what had to be asked for comes after the rest)."""
        self.body = Text.assemble(self.body, more)
        self.query_one(f"#{self.body_id}", Static).update(self.body)


class LogScreen(ModalScreen[None]):
    """A model's log (the ``logs`` command), followed: what it writes appears within
    FOLLOW_INTERVAL_S; ``f`` pauses and resumes following."""

    DEFAULT_CSS = """
    LogScreen { align: center middle; }
    LogScreen > Vertical {
        width: 95%; height: 90%; border: thick $accent; background: $surface;
    }
    LogScreen #log-title { height: 1; padding: 0 1; }
    LogScreen Log { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape,q", "close", "Close", id="logs.close"),
        Binding("f", "toggle_follow", "Follow", id="logs.follow"),
    ]

    def __init__(
        self, title: str, fetch: LogFetch, *, interval_s: float = FOLLOW_INTERVAL_S
    ) -> None:
        super().__init__()
        self.title_text = title
        self.fetch = fetch
        self.interval_s = interval_s
        self.following = True
        self.lines_shown = 0
        self.problem: str | None = None

    def compose(self) -> ComposeResult:
        # Kept: a reply that comes while the screen is being taken down must not look
        # its widgets up (they are gone before the worker is).
        self.title_line = Static(id="log-title")
        self.log_view = Log(max_lines=LOG_VIEW_LINES, auto_scroll=True)
        with Vertical():
            yield self.title_line
            yield self.log_view

    def on_mount(self) -> None:
        self._show_title()
        self.follower = self.run_worker(self._follow(), name="follow-log", exclusive=True)

    async def _follow(self) -> None:
        cursor: str | None = None
        while True:
            if cursor is None or self.following:
                got = await self.fetch(cursor)
                if not self.is_attached:
                    return
                moved = self._show(got, cursor)
                cursor = got.cursor if isinstance(got, LogLines) else cursor
                self._show_title()
                # Lines already waiting are asked for at once, as long as the cursor moves
                # (an agent saying "more" without moving it must not make this spin).
                if moved and isinstance(got, LogLines) and got.more:
                    continue
            await asyncio.sleep(self.interval_s)

    def _show(self, got: LogLines | str, cursor: str | None) -> bool:
        """Write what came; whether the cursor moved."""
        if isinstance(got, str):
            self.problem = got
            return False
        self.problem = None
        if got.restarted:
            self.log_view.write_line("── the server restarted: its new log from the start ──")
        if got.lines:
            self.log_view.write_lines([printable(line) for line in got.lines])
            self.lines_shown += len(got.lines)
        return got.cursor != cursor

    def _show_title(self) -> None:
        text = Text(self.title_text, style="bold")
        if self.following:
            text.append("  following (f pauses)", style="green")
        else:
            text.append("  paused (f follows)", style="yellow")
        text.append(f"  {self.lines_shown} lines  Esc closes", style="dim")
        if self.problem:
            text.append(f"  {printable(self.problem)}", style="bold red")
        self.title_line.update(text)

    def action_toggle_follow(self) -> None:
        self.following = not self.following
        self._show_title()

    def action_close(self) -> None:
        self.follower.cancel()
        self.dismiss(None)


class DebugScreen(DetailScreen):
    """What the TUI skipped: counts by reason and the latest offenders."""

    BINDINGS = [Binding("escape,d,q", "close", "Close", id="debug.close")]

    def __init__(self, store: BusStore) -> None:
        super().__init__(render_skipped(store), body_id="skipped")
        self.store = store


def render_skipped(store: BusStore) -> Text:
    text = Text("Skipped messages", style="bold")
    total = sum(store.skipped.values())
    text.append(f" ({total}; they never change the screen)\n\n")
    if not total:
        text.append("Nothing skipped: every message on the bus was understood.\n", style="dim")
        return text
    for reason, count in store.skipped.most_common():
        text.append(f"{count:>7}  {reason}\n")
    text.append("\nLatest\n", style="bold")
    for problem in reversed(store.problems):
        text.append(f"{problem.reason}", style="yellow")
        text.append(f"  {problem.topic}\n    {problem.detail}\n")
    return text

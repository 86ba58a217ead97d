"""Modal questions (confirm, ask for a repo) and the debug view of skipped messages."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from tui.store import BusStore


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

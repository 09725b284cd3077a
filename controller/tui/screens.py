"""Modal screens: confirm, error with its fix, the key list, a quality report."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 72; max-width: 95%; height: auto; max-height: 90%;
    border: thick $primary; background: $surface; padding: 1 2;
}}
{name} .title {{ text-style: bold; margin-bottom: 1; }}
{name} Horizontal {{ height: auto; align-horizontal: right; margin-top: 1; }}
{name} Button {{ margin-left: 2; }}
"""


class ConfirmScreen(ModalScreen[bool]):
    """Ask yes/no; dismisses with True for yes."""

    DEFAULT_CSS = MODAL_CSS.format(name="ConfirmScreen")
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, title: str, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.title_text, self.question, self.yes, self.no = title, question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.title_text, classes="title")
            yield Static(self.question)
            with Horizontal():
                yield Button(f"{self.no} (n)", id="no")
                yield Button(f"{self.yes} (y)", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ErrorScreen(ModalScreen[None]):
    """A known failure: what happened and how to fix it; never a traceback."""

    DEFAULT_CSS = MODAL_CSS.format(name="ErrorScreen") + """
    ErrorScreen > Vertical { border: thick $error; }
    ErrorScreen .fix { color: $warning; margin-top: 1; }
    """
    BINDINGS = [Binding("escape,enter,o", "dismiss", "Close")]

    def __init__(self, title: str, message: str, hint: str = "") -> None:
        super().__init__()
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text), classes="title")
            yield Static(Text(self.message))
            if self.hint:
                yield Static(Text(f"Fix: {self.hint}"), classes="fix")
            with Horizontal():
                yield Button("OK (enter)", id="ok", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, _: Button.Pressed) -> None:
        self.dismiss()


class HelpScreen(ModalScreen[None]):
    """Every key of the app, generated from its bindings so the list never drifts."""

    DEFAULT_CSS = MODAL_CSS.format(name="HelpScreen") + """
    HelpScreen > Vertical { width: 76; padding: 0 1; }
    HelpScreen VerticalScroll { height: auto; max-height: 20; }
    HelpScreen .note { color: $text-muted; margin-top: 1; }
    """
    BINDINGS = [Binding("escape,question_mark,q,enter", "dismiss", "Close")]

    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = list(keys)

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in self.keys:
            table.add_row(key, what)
        with Vertical():
            yield Static("Keys  (esc closes; ctrl+p opens the command palette)", classes="title")
            with VerticalScroll():
                yield Static(table)
            yield Static("A ! after a phone's model marks a preflight warning; the log says "
                         "how to fix it.", classes="note")


class ReportScreen(ModalScreen[None]):
    """A session's label-quality report, rendered as rich tables."""

    DEFAULT_CSS = MODAL_CSS.format(name="ReportScreen") + """
    ReportScreen > Vertical { width: 100; height: 90%; }
    ReportScreen VerticalScroll { height: 1fr; }
    """
    BINDINGS = [Binding("escape,enter,o,q", "dismiss", "Close")]

    def __init__(self, title: str, renderables: list[RenderableType]) -> None:
        super().__init__()
        self.title_text, self.renderables = title, renderables

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text), classes="title")
            with VerticalScroll():
                for r in self.renderables:
                    yield Static(r)

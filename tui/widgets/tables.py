"""Bring a DataTable to a wanted set of rows in place, keeping the cursor on its row;
fit a table's last column to its width."""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

Cells = Sequence[str | Text]


def sync_rows(table: DataTable[str | Text], rows: Sequence[tuple[str, Cells]]) -> None:
    """Update cells that changed, add and remove rows; rebuild only when the order changed."""
    wanted = [key for key, _ in rows]
    current = [row.key.value for row in table.ordered_rows]
    if current != wanted:
        cursor_key = _cursor_key(table)
        table.clear()
        # clear() keeps each column as wide as its widest cell ever was.
        for emptied in table.columns.values():
            emptied.content_width = emptied.label.cell_len
        for key, cells in rows:
            table.add_row(*cells, key=key)
        if cursor_key in wanted:
            table.move_cursor(row=wanted.index(cursor_key), animate=False)
        return
    columns = [column.key for column in table.ordered_columns]
    for key, cells in rows:
        for column, value in zip(columns, cells, strict=True):
            if table.get_cell(key, column) != value:
                table.update_cell(key, column, value, update_width=True)


def _cursor_key(table: DataTable[str | Text]) -> str | None:
    if table.row_count == 0:
        return None
    try:
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # cursor outside the rows: nothing selected
        return None
    return key


def selected_key(table: DataTable[str | Text]) -> str | None:
    """The key of the row under the cursor, if any."""
    return _cursor_key(table)


def fit_last_column(
    labels: Sequence[str], rows: Sequence[tuple[str, Cells]], width: int, padding: int = 1
) -> list[tuple[str, list[str | Text]]]:
    """The rows with their last cell cut (with an ellipsis) to what the table's width
    leaves it, so the table never scrolls sideways: a scrollbar took a row at 80
    columns. Enter shows a row in full."""
    widths = [cell_len(label) for label in labels[:-1]]
    for _, cells in rows:
        for i, cell in enumerate(cells[:-1]):
            widths[i] = max(widths[i], cell_len(cell.plain if isinstance(cell, Text) else cell))
    room = max(width - sum(widths) - 2 * padding * len(labels), cell_len(labels[-1]))
    fitted: list[tuple[str, list[str | Text]]] = []
    for key, cells in rows:
        last = cells[-1]
        text = last.copy() if isinstance(last, Text) else Text(last)
        if text.cell_len > room:
            text.truncate(room, overflow="ellipsis")
        fitted.append((key, [*cells[:-1], text]))
    return fitted

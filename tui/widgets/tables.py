"""Bring a DataTable to a wanted set of rows in place, keeping the cursor on its row."""

from __future__ import annotations

from collections.abc import Sequence

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

"""Sparklines of a GPU's last minutes (memory used, utilization), one block per time slice.
Pure: the GPU panel draws what these return."""

from __future__ import annotations

from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(
    points: Sequence[tuple[float, float | None]], now: float, window_s: float, cells: int
) -> str:
    """``cells`` blocks for the ``window_s`` before ``now``, each the highest value (a
    fraction, 0 to 1) seen in its slice; a slice with none is blank (a TUI started a minute
    ago shows a minute)."""
    if cells <= 0:
        return ""
    slices: list[float | None] = [None] * cells
    start = now - window_s
    for moment, value in points:
        if value is None or moment < start:
            continue
        index = min(int((moment - start) / window_s * cells), cells - 1)
        seen = slices[index]
        slices[index] = value if seen is None else max(seen, value)
    top = len(BLOCKS) - 1
    return "".join(
        " " if value is None else BLOCKS[max(0, min(round(value * top), top))] for value in slices
    )

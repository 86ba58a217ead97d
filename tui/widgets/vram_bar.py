"""The per-GPU panel: a VRAM bar stacked by model, ``other`` and ``free``, with figures.

Each segment has a glyph as well as a colour, so the bar still reads with
``NO_COLOR`` (Textual then drops colours but keeps the characters).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from shared.messages import GpuState
from tui.format import celsius, gib, percent, used_of_total, watts
from tui.memory import Segment, vram_segments
from tui.store import HISTORY_S, HostView
from tui.widgets.sparkline import sparkline

MODEL_GLYPHS = ("█", "▓", "▆", "▚", "▞", "▇")
OTHER_GLYPH = "▒"
STOPPING_GLYPH = "░"  # a model's memory after its processes ended, until it is back
FREE_GLYPH = "·"
MODEL_COLOURS = (
    "dodger_blue2",
    "green3",
    "dark_orange",
    "magenta",
    "cyan3",
    "gold3",
    "medium_purple",
    "spring_green3",
)
_HIGH_USE = 0.9


def model_colour(name: str) -> str:
    """A colour per model name, the same on every GPU and host."""
    return MODEL_COLOURS[zlib.crc32(name.encode()) % len(MODEL_COLOURS)]


def _styles(segments: Sequence[Segment]) -> list[tuple[str, str]]:
    """(glyph, style) per segment: models take glyphs in order so neighbours differ."""
    styles: list[tuple[str, str]] = []
    n = 0
    for seg in segments:
        if seg.label == "free":
            styles.append((FREE_GLYPH, "grey50"))
        elif seg.label == "other":
            styles.append((OTHER_GLYPH, "grey62"))
        elif seg.stopping:
            styles.append((STOPPING_GLYPH, f"dim {model_colour(seg.label)}"))
        else:
            styles.append((MODEL_GLYPHS[n % len(MODEL_GLYPHS)], model_colour(seg.label)))
            n += 1
    return styles


def render_bar(segments: Sequence[Segment], width: int) -> Text:
    """``width`` cells split between the segments in proportion (largest remainder),
    any non-empty used segment getting at least one cell while there is room."""
    bar = Text()
    total = sum(seg.mb for seg in segments)
    if width <= 0:
        return bar
    if total <= 0:
        return Text("?" * width, style="grey50")
    exact = [seg.mb * width / total for seg in segments]
    cells = [int(x) for x in exact]
    for i, seg in enumerate(segments):
        if cells[i] == 0 and seg.mb > 0 and seg.label != "free" and sum(cells) < width:
            cells[i] = 1
    by_remainder = sorted(
        range(len(segments)), key=lambda i: exact[i] - int(exact[i]), reverse=True
    )
    for i in by_remainder:
        if sum(cells) >= width:
            break
        cells[i] += 1
    while sum(cells) > width:  # the minimum cells overshot: take from the widest
        widest = max(range(len(cells)), key=cells.__getitem__)
        cells[widest] -= 1
    for (glyph, style), count in zip(_styles(segments), cells, strict=True):
        bar.append(glyph * count, style=style)
    return bar


def render_legend(segments: Sequence[Segment]) -> Text:
    legend = Text()
    for (glyph, style), seg in zip(_styles(segments), segments, strict=True):
        if seg.label == "free":
            continue
        if legend:
            legend.append("  ")
        legend.append(glyph, style=style)
        legend.append(f" {seg.label} {gib(seg.mb)}" + (" stopping" if seg.stopping else ""))
    return legend


# The processes' columns, as render_processes lays them out.
PROCESSES_HEADER = f"    {'pid':>7}  {'mem':>6}  {'process':<24}  belongs to"


def render_processes(gpu: GpuState) -> Text:
    """nvitop's view of one GPU: every process using memory, largest first, with what it
    belongs to (a catalog model, its container) or ``not managed``."""
    lines = Text()
    procs = sorted(gpu.processes, key=lambda p: -(p.used_mb or 0))
    if not procs:
        return Text("    no processes use it", style="dim")
    for proc in procs:
        if lines:
            lines.append("\n")
        owner = proc.model or "not managed"
        if proc.container:
            owner += f" (container {proc.container})"
        lines.append(f"    {proc.pid:>7}  {gib(proc.used_mb):>6}  ")
        lines.append(f"{(proc.name or '?')[:24]:<24}  ", style="dim")
        lines.append(owner, style=model_colour(proc.model) if proc.model else "yellow")
    return lines


@dataclass(frozen=True, slots=True)
class GpuHistory:
    """A GPU's last minutes, for its sparklines."""

    memory: Sequence[tuple[float, float | None]]
    utilization: Sequence[tuple[float, float | None]]
    now: float


def render_history(history: GpuHistory, room: int) -> Text:
    """``  mem ▁▂▅ util ▁▁▃`` over the last HISTORY_S, as wide as ``room`` allows (nothing
    where fewer than 8 blocks each would fit)."""
    cells = min((room - len("  mem  util ")) // 2, 30)
    if cells < 8:
        return Text()
    text = Text("  mem ", style="dim")
    text.append(sparkline(history.memory, history.now, HISTORY_S, cells), style="cyan")
    text.append(" util ", style="dim")
    text.append(sparkline(history.utilization, history.now, HISTORY_S, cells), style="green")
    return text


def render_gpu(
    gpu: GpuState,
    width: int,
    stopping: Mapping[str, int] | None = None,
    history: GpuHistory | None = None,
) -> Text:
    """Two or more lines: ``GPU i [bar] used/total util temp power``, then the legend."""
    used = gpu.memory_used_mb
    if used is None and gpu.memory_total_mb is not None and gpu.memory_free_mb is not None:
        used = gpu.memory_total_mb - gpu.memory_free_mb
    figures = used_of_total(used, gpu.memory_total_mb)
    label = f"GPU{gpu.index} "
    bar_width = max(width - len(label) - len(figures) - 3, 4)
    # Styles go on the pieces: a style given to Text() would cover everything appended.
    line = Text.assemble((label, "bold"), "[")
    segments = vram_segments(gpu, stopping)
    line.append_text(render_bar(segments, bar_width))
    line.append("] ")
    high = used is not None and gpu.memory_total_mb and used / gpu.memory_total_mb >= _HIGH_USE
    line.append(figures, style="bold red" if high else "bold")
    stats = Text("  ")
    stats.append(f"util {percent(gpu.utilization_percent)}  {celsius(gpu.temperature_c)}  ")
    stats.append(watts(gpu.power_w, gpu.power_limit_w))
    for alert in gpu.alerts:
        stats.append(f"  ⚠ {alert}", style="bold red")
    # The sparklines before the model name: the name is the same on every GPU of a host.
    name = f"  {gpu.name}" if gpu.name else ""
    if history is not None:
        stats.append_text(render_history(history, width - stats.cell_len))
    if name and stats.cell_len + len(name) <= width:
        stats.append(name, style="dim")
    legend = render_legend(segments)
    out = Text("\n").join([line, stats])
    if legend:
        out.append("\n  ")
        out.append_text(legend)
    return out


class GpuPanel(Widget):
    """Every GPU of the selected host."""

    DEFAULT_CSS = """
    GpuPanel { height: auto; max-height: 50%; padding: 0 1; }
    GpuPanel.-processes { max-height: 85%; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.view: HostView | None = None
        self._lines = 0

    # What the panel says before any host is on the bus (the app words it by the link).
    waiting = "Waiting for a GPU host on the bus…"
    # Each GPU's processes under its bar (the g key), as nvitop lists them.
    processes = False
    now = 0.0  # the store's clock at the last show: the sparklines end there

    def show(self, view: HostView | None, now: float = 0.0) -> None:
        self.view = view
        self.now = now
        # A layout pass only when the panel's height changes (GPUs or legend lines).
        lines = len(self.render().plain.splitlines())
        self.refresh(layout=lines != self._lines)
        self._lines = lines

    def render(self) -> Text:
        view = self.view
        width = max(self.content_size.width, 20)
        if view is None:
            return Text(self.waiting, style="dim")
        if not view.gpus:
            return Text(f"{view.host_id}: no GPU telemetry yet", style="dim")
        parts = []
        for index in sorted(view.gpus):
            history = GpuHistory(
                view.memory_history(index), view.utilization_history(index), self.now
            )
            parts.append(render_gpu(view.gpus[index], width, view.stopping_on(index), history))
            if self.processes:
                parts.append(Text(PROCESSES_HEADER, style="bold dim"))
                parts.append(render_processes(view.gpus[index]))
        return Text("\n").join(parts)

"""How sizes, durations and ages read to a person: the one place for it. Compact forms
(``23.4G``, ``3m05s``) fit the TUI's panels; long forms (``23.4 GiB``, ``3 min 5 s``) read
in the sentences of the command-line client. Pure: no Textual here, so the client can use
it without loading the UI."""

from __future__ import annotations

import re
from datetime import datetime

# Escape sequences (CSI, OSC, DCS and the like, whole) and every other control character
# but the line break: what a model server's output or an agent's message may carry.
_CONTROLS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clearing the screen
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: titles, the clipboard, links
    r"|\x1b[P^_X][^\x1b]*(?:\x1b\\)?"  # DCS, PM, APC, SOS
    r"|\x1b.?"  # any other escape
    r"|[\x00-\x09\x0b-\x1f\x7f-\x9f]"
)


def printable(text: str) -> str:
    """``text`` safe to draw: tabs expanded, escape sequences and control characters
    removed. Text from elsewhere (a server's log, an agent's message) could otherwise
    clear the operator's screen or set its clipboard."""
    return _CONTROLS.sub("", text.expandtabs())


def gib(mb: int | None) -> str:
    """MiB as GiB with one decimal (``23.4G``); ``?`` when unknown."""
    if mb is None:
        return "?"
    return f"{mb / 1024:.1f}G"


def size(nbytes: int) -> str:
    """Bytes for people: ``812M`` below a GiB, ``3.2G`` from there."""
    mib = nbytes / (1024 * 1024)
    return f"{mib:.0f}M" if mib < 1024 else f"{mib / 1024:.1f}G"


def used_of_total(used_mb: int | None, total_mb: int | None) -> str:
    if total_mb is None:
        return "?/?"
    return f"{gib(used_mb)[:-1]}/{gib(total_mb)}"


def duration(seconds: float | None) -> str:
    """A short duration: ``42s``, ``3m05s``, ``2h10m``, ``3d4h``; ``-`` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def ago(moment: datetime | None, now: datetime) -> str:
    """How long before ``now`` a moment was (``5m02s``); ``-`` when never."""
    if moment is None:
        return "-"
    return duration((now - moment).total_seconds())


def clock(moment: datetime) -> str:
    """Local wall-clock time of an event, ``HH:MM:SS``."""
    return moment.astimezone().strftime("%H:%M:%S")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def watts(value: float | None, limit: float | None = None) -> str:
    if value is None:
        return "-W"
    if limit:
        return f"{value:.0f}/{limit:.0f}W"
    return f"{value:.0f}W"


def celsius(value: int | None) -> str:
    return "-°C" if value is None else f"{value}°C"


def size_long(count: float) -> str:
    """Bytes in a sentence: ``512.0 MiB``, ``1.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def duration_long(seconds: float) -> str:
    """A duration in a sentence: ``6.0 s``, ``3 min 5 s``, ``2 h 10 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"

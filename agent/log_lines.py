"""A model server's output as the ``logs`` command answers it, pure: which lines of a window
of bytes fit one reply, long lines cut, and the cursor a client passes back as ``since``.

A cursor is ``<run>.<position>``. The run names the server's run the lines came from (a
process log's run marker, a container's id): a cursor of another run means the log
restarted, and reading starts at the new run's beginning. The position says where the
lines given end within the run, in the runtime's own terms (a byte offset; a container's
log timestamp). Both are plain ``[A-Za-z0-9_-]`` tokens, so a cursor fits the contract's
pattern for ``since``.

A reply is bounded twice: ``lines`` lines at most, and ``REPLY_LINES_BYTES`` of lines as
JSON (escapes included), well under the largest message the bus carries. A line longer
than ``LOG_LINE_MAX_BYTES`` is cut and marked (``LOG_LINE_CUT``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from shared.replies import LOG_LINE_CUT, LOG_LINE_MAX_BYTES

# What a reply's lines may take as JSON: the envelope, the model and the cursor fit many
# times in what is left under the bus's 255 KiB (bus.mqtt.MAX_PUBLISH_BYTES).
REPLY_LINES_BYTES = 192 * 1024
# Bytes read at most for one reply: enough to fill the budget, and one line to cut.
READ_WINDOW_BYTES = REPLY_LINES_BYTES + LOG_LINE_MAX_BYTES + 1
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,80}")


class BadCursor(ValueError):
    """``since`` is not a cursor this agent gave for this model's log."""


@dataclass(frozen=True, slots=True)
class LogCursor:
    run: str
    position: str

    def __post_init__(self) -> None:
        if not (_TOKEN.fullmatch(self.run) and _TOKEN.fullmatch(self.position)):
            raise BadCursor(f"not a cursor: {self.run!r}.{self.position!r}")

    @property
    def text(self) -> str:
        return f"{self.run}.{self.position}"

    @classmethod
    def parse(cls, text: str) -> LogCursor:
        run, dot, position = text.partition(".")
        if not dot:
            raise BadCursor(f"{text[:40]!r} is not a cursor of a logs reply")
        return cls(run, position)


@dataclass(frozen=True, slots=True)
class LogRead:
    """What one ``logs`` reply holds (shared.replies.LogLines, less the model)."""

    lines: tuple[str, ...]
    cursor: LogCursor
    more: bool = False
    restarted: bool = False
    cut_lines: int = 0


def line_text(raw: bytes) -> tuple[str, bool]:
    """One line of output as text (undecodable bytes replaced), cut when too long."""
    if raw.endswith(b"\r"):  # a terminal's line end (a TTY container's output)
        raw = raw[:-1]
    if len(raw) > LOG_LINE_MAX_BYTES:
        return raw[:LOG_LINE_MAX_BYTES].decode("utf-8", "replace") + LOG_LINE_CUT, True
    return raw.decode("utf-8", "replace"), False


class LineBudget:
    """Collects lines while they fit: ``count`` lines and ``budget`` bytes of JSON."""

    def __init__(self, count: int, budget: int = REPLY_LINES_BYTES) -> None:
        self.count = count
        self.budget = budget
        self.lines: list[str] = []
        self.cut = 0
        self._spent = 0

    @property
    def full(self) -> bool:
        return len(self.lines) >= self.count

    def add(self, raw: bytes) -> bool:
        """Take the line; False (and nothing taken) when it no longer fits."""
        if self.full:
            return False
        text, cut = line_text(raw)
        # As the reply will carry it: quoted, escaped, and a comma.
        size = len(json.dumps(text, ensure_ascii=False).encode()) + 1
        if self._spent + size > self.budget:
            return False
        self._spent += size
        self.lines.append(text)
        self.cut += cut
        return True


@dataclass(frozen=True, slots=True)
class Forward:
    """The lines read forward from a position: what was taken, and where it ends."""

    lines: tuple[str, ...]
    consumed: int  # bytes of the window the lines (and any skipped bytes) covered
    cut_lines: int
    # The window ended inside a cut line: skip to its end before the next line.
    skipping: bool
    # A line was left that did not fit this reply.
    left: bool


def take_forward(
    window: bytes,
    count: int,
    *,
    complete: bool,
    skipping: bool = False,
    budget: int = REPLY_LINES_BYTES,
) -> Forward:
    """The first ``count`` lines of ``window`` that fit ``budget``. Bytes after the last
    newline are a line only when ``complete`` (its writer is gone) or when they already
    exceed LOG_LINE_MAX_BYTES (cut, and the rest skipped); otherwise they wait for their
    newline. ``skipping`` drops the bytes up to the first newline (a cut line's rest)."""
    position = 0
    if skipping:
        newline = window.find(b"\n")
        if newline < 0:
            return Forward((), len(window), 0, True, False)
        position = newline + 1
        skipping = False
    taken = LineBudget(count, budget)
    left = False
    while position < len(window):
        newline = window.find(b"\n", position)
        end = len(window) if newline < 0 else newline
        overlong = end - position > LOG_LINE_MAX_BYTES
        if newline < 0 and not (complete or overlong):
            break  # a line still being written
        if not taken.add(window[position:end]):
            left = True
            break
        position = end + 1 if newline >= 0 else end
        if newline < 0:
            skipping = not complete
    return Forward(tuple(taken.lines), min(position, len(window)), taken.cut, skipping, left)


@dataclass(frozen=True, slots=True)
class Tail:
    lines: tuple[str, ...]
    end: int  # where in the window the last line taken ends (its newline included)
    cut_lines: int
    # The last line is a cut one still being written: skip its rest when following.
    skipping: bool = False


def take_last(
    window: bytes,
    count: int,
    *,
    starts_at_line: bool,
    complete: bool,
    budget: int = REPLY_LINES_BYTES,
) -> Tail:
    """The last ``count`` lines of ``window`` that fit ``budget``, oldest first. A window
    that does not start at a line's start loses its first, cut line (unless it holds no
    newline at all); bytes after the last newline count as in take_forward."""
    end = len(window)
    last_newline = window.rfind(b"\n")
    partial = end - (last_newline + 1)
    if not complete and 0 < partial <= LOG_LINE_MAX_BYTES:
        end = last_newline + 1
    skipping = not complete and partial > LOG_LINE_MAX_BYTES
    start = 0
    if not starts_at_line and last_newline >= 0:
        start = window.find(b"\n") + 1
    body = window[start:end]
    raws = body.split(b"\n")
    if body.endswith(b"\n") or not body:
        raws.pop()
    taken = LineBudget(count, budget)
    for raw in reversed(raws):
        if not taken.add(raw):
            break
    return Tail(tuple(reversed(taken.lines)), end, taken.cut, skipping and bool(taken.lines))


def read_position(position: str) -> tuple[int, bool]:
    """A byte offset position (``1234``, or ``1234s`` inside a cut line)."""
    digits = position.removesuffix("s")
    if not digits.isdigit() or len(digits) > 19:
        raise BadCursor(f"{position!r} is not a position in a log file")
    return int(digits), position.endswith("s")


def byte_position(offset: int, skipping: bool) -> str:
    return f"{offset}{'s' if skipping else ''}"

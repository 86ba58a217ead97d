"""The logs command's pure half (agent/log_lines.py, the cursor of runtimes/docker_logs.py):
which lines fit a reply, long lines cut, and cursors that follow a growing log exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.log_lines import (
    READ_WINDOW_BYTES,
    REPLY_LINES_BYTES,
    BadCursor,
    LogCursor,
    line_text,
    read_position,
    take_forward,
    take_last,
)
from agent.runtimes.docker_logs import read_stamp_position, stamp_ns, stamp_position
from shared.replies import LOG_LINE_CUT, LOG_LINE_MAX_BYTES


def test_a_cursor_is_its_run_and_position() -> None:
    cursor = LogCursor.parse("18f3a2b.1024s")
    assert (cursor.run, cursor.position) == ("18f3a2b", "1024s")
    assert cursor.text == "18f3a2b.1024s"
    assert read_position(cursor.position) == (1024, True)
    assert read_position("0") == (0, False)
    for bad in ["", "nodot", ".5", "run.", "a.b.c", "a b.1", "x" * 81 + ".1"]:
        with pytest.raises(BadCursor):
            LogCursor.parse(bad)
    for position in ["-1", "1x", "s", "1" * 20, "12-3"]:
        with pytest.raises(BadCursor):
            read_position(position)


def test_a_container_position_is_a_timestamp_and_a_count() -> None:
    assert stamp_ns(b"2025-06-14T09:15:03.412345678Z") == 1749892503_412345678
    assert stamp_ns(b"2025-06-14T09:15:03Z") == 1749892503_000000000
    assert stamp_ns(b"2025-06-14T09:15:03.5Z") == 1749892503_500000000
    assert stamp_ns(b"hello") is None and stamp_ns(b"\xff") is None
    assert read_stamp_position(stamp_position(1749892503_412345678, 2)) == (1749892503412345678, 2)
    for bad in ["12", "a-1", "1-b", "-1", "1-"]:
        with pytest.raises(BadCursor):
            read_stamp_position(bad)


def test_a_line_is_text_cut_when_too_long() -> None:
    assert line_text(b"plain\r") == ("plain", False)
    assert line_text(b"bad \xff byte") == ("bad \ufffd byte", False)
    text, cut = line_text(b"y" * (LOG_LINE_MAX_BYTES + 1))
    assert cut and text == "y" * LOG_LINE_MAX_BYTES + LOG_LINE_CUT


def test_forward_stops_at_the_count_and_says_more_is_left() -> None:
    window = b"one\ntwo\nthree\n"
    found = take_forward(window, 2, complete=False)
    assert found.lines == ("one", "two") and found.consumed == 8 and found.left
    rest = take_forward(window[found.consumed :], 2, complete=False)
    assert rest.lines == ("three",) and rest.consumed == 6 and not rest.left


def test_a_line_still_being_written_waits_for_its_newline_unless_its_writer_is_gone() -> None:
    window = b"done\nhalf a li"
    live = take_forward(window, 10, complete=False)
    assert live.lines == ("done",) and live.consumed == 5 and not live.left
    ended = take_forward(window, 10, complete=True)
    assert ended.lines == ("done", "half a li") and ended.consumed == len(window)
    assert take_last(window, 10, starts_at_line=True, complete=False).lines == ("done",)
    assert take_last(window, 10, starts_at_line=True, complete=False).end == 5
    assert take_last(window, 10, starts_at_line=True, complete=True).lines == ("done", "half a li")


def test_an_overlong_line_is_cut_and_its_rest_skipped_across_reads() -> None:
    long = b"z" * (LOG_LINE_MAX_BYTES + 10)
    first = take_forward(b"a\n" + long[:-5], 10, complete=False)
    # The window ends inside the long line: cut now, its rest skipped next time.
    assert first.lines == ("a", "z" * LOG_LINE_MAX_BYTES + LOG_LINE_CUT)
    assert first.cut_lines == 1 and first.skipping
    second = take_forward(b"zzzzz\nnext\n", 10, complete=False, skipping=True)
    assert second.lines == ("next",) and not second.skipping and second.consumed == 11
    nothing = take_forward(b"zzz", 10, complete=False, skipping=True)
    assert nothing.lines == () and nothing.consumed == 3 and nothing.skipping
    # The newest line of a tail may be one too: following from there skips its rest.
    tail = take_last(b"a\n" + long, 5, starts_at_line=True, complete=False)
    assert tail.lines[-1].endswith(LOG_LINE_CUT) and tail.skipping and tail.end == len(long) + 2
    assert not take_last(b"a\n" + long, 5, starts_at_line=True, complete=True).skipping


def test_the_reply_budget_counts_lines_as_json_escapes_them() -> None:
    # Control characters take six bytes each in JSON: a budget of raw bytes would overflow.
    escaped = "\x1b" * 1000
    per_line = len(json.dumps(escaped)) + 1
    window = (escaped + "\n").encode() * 400
    found = take_forward(window, 1000, complete=False)
    assert len(found.lines) == REPLY_LINES_BYTES // per_line and found.left
    assert len(json.dumps(list(found.lines))) <= REPLY_LINES_BYTES
    tail = take_last(window, 1000, starts_at_line=True, complete=False)
    assert len(tail.lines) == REPLY_LINES_BYTES // per_line


def test_the_last_lines_drop_the_first_when_the_window_cuts_it() -> None:
    tail = take_last(b"ut line\nfull\nlast\n", 5, starts_at_line=False, complete=True)
    assert tail.lines == ("full", "last")
    assert take_last(b"one\ntwo\nthree\n", 2, starts_at_line=True, complete=False).lines == (
        "two",
        "three",
    )
    # A window without any newline is one (cut) line, not nothing.
    assert take_last(b"x" * 20, 5, starts_at_line=False, complete=True).lines == ("x" * 20,)
    assert take_last(b"", 5, starts_at_line=True, complete=True).lines == ()


class GrowingLog:
    """A log that grows by appends, read as LogFile reads it: a window from the cursor."""

    def __init__(self) -> None:
        self.data = b""
        self.offset = 0
        self.skipping = False

    def follow(self, count: int, *, complete: bool) -> list[str]:
        window = self.data[self.offset : self.offset + READ_WINDOW_BYTES]
        at_end = self.offset + len(window) >= len(self.data)
        found = take_forward(window, count, complete=complete and at_end, skipping=self.skipping)
        self.offset += found.consumed
        self.skipping = found.skipping
        return list(found.lines)


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.text(max_size=40).map(lambda t: t.replace("\n", "").replace("\r", ""))),
    chunk=st.integers(min_value=1, max_value=64),
    count=st.integers(min_value=1, max_value=5),
)
def test_following_a_growing_log_gives_every_line_once_in_order(
    lines: list[str], chunk: int, count: int
) -> None:
    """However the writes fall and however few lines a reply holds, asking again with the
    cursor gives each line exactly once, and a half-written line only once it is whole."""
    content = "".join(line + "\n" for line in lines).encode()
    log = GrowingLog()
    seen: list[str] = []
    for start in range(0, len(content), chunk):
        log.data += content[start : start + chunk]
        while taken := log.follow(count, complete=False):
            seen += taken
    seen += log.follow(len(lines) + 1, complete=True)
    assert seen == lines

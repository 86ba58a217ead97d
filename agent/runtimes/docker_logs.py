"""A container's output as the ``logs`` command reads it, with dockerd's own timestamps as
the cursor. Blocking (the docker SDK's calls on a container object): the Docker runtime
calls it in a worker thread, under its timeout.

The cursor's run is the container's id: a container this runtime creates is new at each
start, while a named one keeps its log across starts (one log, never restarted). Its
position is the timestamp of the last line given, in nanoseconds, and how many lines
given carried that very timestamp. dockerd's ``since`` takes (fractions of) seconds and
includes its bound, so it is asked from a little earlier, and the lines at or before the
cursor are dropped here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from agent.log_lines import BadCursor, LineBudget, LogCursor, LogRead

# The run of a model without a container (never started, or removed since).
NO_CONTAINER = "none"
NS = 1_000_000_000


def read_container_log(container: Any | None, since: LogCursor | None, lines: int) -> LogRead:
    """The last ``lines`` lines of the container's log, or the first after ``since``."""
    if container is None:
        return LogRead((), since or LogCursor(NO_CONTAINER, "0-0"))
    run = str(container.id)[:12]
    if since is None:
        output: bytes = container.logs(timestamps=True, tail=lines)
        return _last(run, list(_stamped(output.split(b"\n"))), lines)
    after_ns, seen = read_stamp_position(since.position)
    restarted = since.run != run
    if restarted:
        after_ns, seen = 0, 0
    # A millisecond early: a float of seconds holds no nanoseconds, and dockerd includes
    # its bound anyway.
    start = (after_ns // 1_000_000 - 1) / 1000 if after_ns > NS else None
    stream = container.logs(stream=True, follow=False, timestamps=True, since=start)
    taken = LineBudget(lines)
    last_ns, at_last, left = after_ns, seen, False
    try:
        for stamp_ns, raw in _stamped(_lines(stream)):
            if stamp_ns < after_ns or (stamp_ns == after_ns and seen > 0):
                seen -= stamp_ns == after_ns
                continue
            if not taken.add(raw):
                left = True
                break
            at_last = at_last + 1 if stamp_ns == last_ns else 1
            last_ns = stamp_ns
    finally:
        stream.close()
    return LogRead(
        tuple(taken.lines),
        LogCursor(run, stamp_position(last_ns, at_last)),
        more=left,
        restarted=restarted,
        cut_lines=taken.cut,
    )


def _last(run: str, stamped: list[tuple[int, bytes]], lines: int) -> LogRead:
    taken = LineBudget(lines)
    for _, raw in reversed(stamped):
        if not taken.add(raw):
            break
    if not stamped:
        return LogRead((), LogCursor(run, "0-0"))
    last_ns = stamped[-1][0]
    at_last = sum(1 for stamp_ns, _ in stamped if stamp_ns == last_ns)
    return LogRead(
        tuple(reversed(taken.lines)),
        LogCursor(run, stamp_position(last_ns, at_last)),
        cut_lines=taken.cut,
    )


def stamp_position(stamp_ns: int, at_stamp: int) -> str:
    return f"{stamp_ns}-{at_stamp}"


def read_stamp_position(position: str) -> tuple[int, int]:
    stamp, dash, count = position.partition("-")
    if not (dash and stamp.isdigit() and count.isdigit() and len(stamp) <= 20 and len(count) <= 9):
        raise BadCursor(f"{position!r} is not a position in a container's log")
    return int(stamp), int(count)


def stamp_ns(stamp: bytes) -> int | None:
    """dockerd's ``2025-06-14T09:15:03.412345678Z`` in nanoseconds since the epoch."""
    try:
        text = stamp.decode("ascii")
        whole, _, fraction = text.removesuffix("Z").partition(".")
        seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    except ValueError:
        return None
    if not fraction.isdigit():
        return seconds * NS if not fraction else None
    return seconds * NS + int(fraction[:9].ljust(9, "0"))


def _stamped(raws: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Each line without its timestamp, with it in nanoseconds; a line without one takes
    the last line's."""
    last = 0
    for raw in raws:
        if not raw:
            continue
        head, _, rest = raw.partition(b" ")
        found = stamp_ns(head)
        if found is None:
            yield last, raw
        else:
            last = found
            yield found, rest


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Whole lines out of a stream's chunks (a frame may hold several, or part of one)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *whole, pending = pending.split(b"\n")
        yield from whole
    if pending:
        yield pending

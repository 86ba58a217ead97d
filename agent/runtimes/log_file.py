"""A process server's log file, ``<state_dir>/logs/<model>.log``, and the marker of the run
it holds, ``<model>.run``. Blocking: the process runtime calls it in worker threads.

Each start truncates the log, so a byte offset means something only within one run: the
marker names the run (a token written after the truncation and before the server starts),
and a ``logs`` cursor carries it. A reader checks the marker before and after reading, so a
start between the two never passes the new run's bytes off as the old one's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.log_lines import (
    READ_WINDOW_BYTES,
    LogCursor,
    LogRead,
    byte_position,
    read_position,
    take_forward,
    take_last,
)

# The run of a log whose marker is missing: written by an agent from before markers, or
# never written at all.
UNKNOWN_RUN = "0"
# Reads a start keeps interrupting are tried this often; the last one stands.
READ_TRIES = 3


@dataclass(frozen=True, slots=True)
class LogFile:
    path: Path

    @property
    def run_path(self) -> Path:
        return self.path.with_suffix(".run")

    def begin_run(self) -> int:
        """Empty the log for a new run and mark the run; returns a descriptor to write it
        with (the caller closes it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: the server's children share this descriptor, and appends never
        # overwrite each other.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            temporary = self.run_path.with_name(self.run_path.name + ".tmp")
            temporary.write_text(f"{time.time_ns():x}\n", encoding="ascii")
            os.replace(temporary, self.run_path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def tail(self, lines: int, window_bytes: int) -> list[str]:
        """The last ``lines`` whole lines of the last ``window_bytes``, for error reports;
        [] when the log cannot be read."""
        with contextlib.suppress(OSError):
            # One byte more, to know whether the window starts on a line.
            return list(self._last(lines, window_bytes + 1, complete=True, run=UNKNOWN_RUN).lines)
        return []

    def read(self, since: LogCursor | None, lines: int, *, complete: bool) -> LogRead:
        """What a ``logs`` reply holds: the last ``lines`` lines, or those after ``since``.
        ``complete``: the server is gone, so a last line without a newline is whole."""
        for _ in range(READ_TRIES):
            run = self._run()
            try:
                found = self._read_run(run, since, lines, complete=complete)
            except FileNotFoundError:
                found = LogRead((), LogCursor(run, "0"), restarted=_other_run(since, run))
            if self._run() == run:
                break
        return found

    def _read_run(
        self, run: str, since: LogCursor | None, lines: int, *, complete: bool
    ) -> LogRead:
        if since is None:
            return self._last(lines, READ_WINDOW_BYTES, complete=complete, run=run)
        offset, skipping = read_position(since.position)
        restarted = since.run != run
        with self.path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            if restarted or offset > size:
                # Another run, or this one's log was emptied under it (copytruncate).
                offset, skipping, restarted = 0, False, True
            log.seek(offset)
            window = log.read(READ_WINDOW_BYTES)
        at_end = offset + len(window) >= size
        found = take_forward(window, lines, complete=complete and at_end, skipping=skipping)
        end = offset + found.consumed
        return LogRead(
            found.lines,
            LogCursor(run, byte_position(end, found.skipping)),
            more=found.left or (not at_end and end < size),
            restarted=restarted,
            cut_lines=found.cut_lines,
        )

    def _last(self, lines: int, window_bytes: int, *, complete: bool, run: str) -> LogRead:
        with self.path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            start = max(0, size - window_bytes)
            log.seek(start)
            window = log.read(size - start)
        found = take_last(window, lines, starts_at_line=start == 0, complete=complete)
        cursor = LogCursor(run, byte_position(start + found.end, found.skipping))
        return LogRead(found.lines, cursor, cut_lines=found.cut_lines)

    def _run(self) -> str:
        try:
            text = self.run_path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return UNKNOWN_RUN
        try:
            return LogCursor(text, "0").run
        except ValueError:
            return UNKNOWN_RUN


def _other_run(since: LogCursor | None, run: str) -> bool:
    return since is not None and since.run != run

"""What the agent remembers across restarts, in one SQLite file under ``state_dir``.

- Learned model facts: the VRAM a model really used and how long it took to load,
  so the planner and the ETAs get better than the catalog's estimates.
- Job history: every job's last published state, so a restarted agent can fail the
  jobs it was running instead of leaving them "running" forever.
- The last ``LOADS_KEPT_PER_MODEL`` loads of each model (VRAM, load time, when).

What the agent started is found again by its runtimes (pid files, container labels), not here.

Plain ``sqlite3``, no ORM. The schema version lives in ``PRAGMA user_version``;
``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``, so a later release
adds a table by appending a step, never by editing one that has shipped.

Threading: the agent calls the store from ``asyncio.to_thread`` workers, so calls arrive
on whichever pool thread is free. One connection is shared, opened with
``check_same_thread=False``, and every call holds ``_lock`` for its whole transaction:
a connection has a single transaction state, so two threads interleaving ``BEGIN`` and
``COMMIT`` on it would commit each other's half-done work. Calls are small (a few rows
each), so the lock is never held for long.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from shared.messages import ErrorCode, ErrorInfo, JobPhase, JobState, JobStatus

log = logging.getLogger(__name__)

# Each new load time counts for 30 % of the average: one slow cold-cache load moves the
# ETA only part of the way, while a lasting change (new weights, a slower disk) dominates
# after a handful of loads (0.7 ** 5 ~ 0.17 of the old value left).
LOAD_TIME_ALPHA = 0.3
LOADS_KEPT_PER_MODEL = 100
JOBS_KEPT = 1000
# How long a call waits for another process (a second agent, an operator's sqlite3
# shell) to release the file before it fails.
BUSY_TIMEOUT_S = 5.0

_UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: model facts, job history, loaded instances.
    (
        """CREATE TABLE models (
            model TEXT PRIMARY KEY,
            last_vram_mb INTEGER,
            load_s_avg REAL,
            load_count INTEGER NOT NULL DEFAULT 0,
            last_loaded_at REAL,
            last_used_at REAL
        )""",
        """CREATE TABLE loads (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            vram_mb INTEGER,
            load_s REAL NOT NULL,
            at REAL NOT NULL
        )""",
        "CREATE INDEX loads_by_model ON loads (model, id)",
        # seq keeps insertion order stable for jobs created in the same instant.
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL UNIQUE,
            command TEXT NOT NULL,
            model TEXT,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            finished_at REAL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_created ON jobs (created_at, seq)",
        "CREATE INDEX jobs_by_state ON jobs (state)",
        """CREATE TABLE instances (
            model TEXT PRIMARY KEY,
            data TEXT NOT NULL
        )""",
    ),
    # 1 -> 2: instances and a model's last use were never read; what runs is found by the
    # runtimes (pid files, container labels), when a model was used is kept in memory.
    ("DROP TABLE instances", "ALTER TABLE models DROP COLUMN last_used_at"),
    # 2 -> 3: what sleeping taught: a model's last wake time and the host RAM it held asleep.
    (
        "ALTER TABLE models ADD COLUMN wake_s REAL",
        "ALTER TABLE models ADD COLUMN sleep_ram_mb INTEGER",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The state database cannot be used; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What this host has measured about a model. Times are ``time.time()`` seconds."""

    model: str
    vram_mb: int | None  # the last measured use; None if never measured
    load_s: float | None  # exponentially weighted average (LOAD_TIME_ALPHA)
    load_count: int
    last_loaded_at: float | None
    wake_s: float | None = None  # its last wake from sleep
    sleep_ram_mb: int | None = None  # host RAM it held when last asleep


@dataclass(frozen=True, slots=True)
class RecordedLoad:
    """One row of ``loads``: a successful load. ``at`` is ``time.time()`` seconds."""

    model: str
    vram_mb: int | None
    load_s: float
    at: float


class Database:
    """The agent's SQLite state. Open with ``Database.open(path)``; every method is
    thread-safe and blocking, so async callers use ``asyncio.to_thread``."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Database:
        """Open (creating it and its directory if needed) and migrate to SCHEMA_VERSION."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the state directory {path.parent} ({exc}); "
                "make it writable or point state_dir elsewhere"
            ) from exc
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the sqlite3
            # module never opens a transaction behind our back.
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _unusable(path, exc) from exc
        try:
            _prepare(connection, path)
        except sqlite3.Error as exc:
            connection.close()
            raise _unusable(path, exc) from exc
        except BaseException:
            connection.close()
            raise
        return cls(path, connection)

    def close(self) -> None:
        """Close the file; later calls raise StoreError. Closing twice is harmless."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- learned model facts ---------------------------------------------

    def record_load(self, model: str, vram_mb: int | None, load_s: float, at: float) -> None:
        """Remember one successful load. ``vram_mb`` None (could not measure) keeps the
        last measurement rather than forgetting it."""
        if not math.isfinite(load_s) or load_s < 0:
            # A NaN would poison the average forever.
            raise ValueError(f"load time must be a finite number of seconds >= 0, not {load_s}")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO loads (model, vram_mb, load_s, at) VALUES (?, ?, ?, ?)",
                (model, vram_mb, load_s, at),
            )
            db.execute(
                """INSERT INTO models (model, last_vram_mb, load_s_avg, load_count, last_loaded_at)
                VALUES (:model, :vram_mb, :load_s, 1, :at)
                ON CONFLICT (model) DO UPDATE SET
                    last_vram_mb = COALESCE(excluded.last_vram_mb, last_vram_mb),
                    load_s_avg = CASE WHEN load_s_avg IS NULL THEN excluded.load_s_avg
                        ELSE :alpha * excluded.load_s_avg + (1 - :alpha) * load_s_avg END,
                    load_count = load_count + 1,
                    last_loaded_at = excluded.last_loaded_at""",
                {
                    "model": model,
                    "vram_mb": vram_mb,
                    "load_s": load_s,
                    "at": at,
                    "alpha": LOAD_TIME_ALPHA,
                },
            )
            # Rows at or below the newest-101st go; with fewer rows the subquery is NULL
            # and nothing is deleted.
            db.execute(
                """DELETE FROM loads WHERE model = :model AND id <= (
                    SELECT id FROM loads WHERE model = :model
                    ORDER BY id DESC LIMIT 1 OFFSET :keep)""",
                {"model": model, "keep": LOADS_KEPT_PER_MODEL},
            )

    def record_sleep(self, model: str, ram_mb: int) -> None:
        """The host RAM ``model`` held once asleep (its processes' resident memory)."""
        self._remember(model, "sleep_ram_mb", ram_mb)

    def record_wake(self, model: str, wake_s: float) -> None:
        if not math.isfinite(wake_s) or wake_s < 0:
            raise ValueError(f"wake time must be a finite number of seconds >= 0, not {wake_s}")
        self._remember(model, "wake_s", wake_s)

    def _remember(self, model: str, column: str, value: float) -> None:
        assert column in ("sleep_ram_mb", "wake_s")  # never a caller's text in the SQL
        with self._transaction() as db:
            db.execute(
                f"""INSERT INTO models (model, {column}) VALUES (?, ?)
                ON CONFLICT (model) DO UPDATE SET {column} = excluded.{column}""",
                (model, value),
            )

    def model_facts(self, model: str) -> ModelFacts | None:
        with self._locked() as db:
            row = db.execute(f"{_FACTS_QUERY} WHERE model = ?", (model,)).fetchone()
        return None if row is None else _facts(row)

    def recent_loads(self, limit: int, model: str | None = None) -> list[RecordedLoad]:
        """The newest ``limit`` loads of every model (of ``model`` alone when given),
        ordered by model, newest first."""
        with self._locked() as db:
            rows = db.execute(
                """SELECT model, vram_mb, load_s, at FROM (
                    SELECT model, vram_mb, load_s, at, id, row_number() OVER (
                        PARTITION BY model ORDER BY id DESC) AS newest
                    FROM loads WHERE :model IS NULL OR model = :model)
                WHERE newest <= :limit ORDER BY model, id DESC""",
                {"model": model, "limit": limit},
            ).fetchall()
        return [RecordedLoad(*row) for row in rows]

    # ---- job history -----------------------------------------------------

    def save_job(self, job: JobState) -> None:
        """Insert or replace the job with this ``job_id``; keep the newest JOBS_KEPT."""
        with self._transaction() as db:
            db.execute(
                """INSERT INTO jobs (job_id, command, model, state, created_at, finished_at, body)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (job_id) DO UPDATE SET
                    command = excluded.command, model = excluded.model,
                    state = excluded.state, created_at = excluded.created_at,
                    finished_at = excluded.finished_at, body = excluded.body""",
                _job_row(job),
            )
            (count,) = db.execute("SELECT count(*) FROM jobs").fetchone()
            if count > JOBS_KEPT:
                # Unfinished jobs are never pruned: fail_interrupted_jobs must still find
                # them after a restart.
                db.execute(
                    f"""DELETE FROM jobs WHERE state NOT IN (?, ?) AND seq IN (
                        SELECT seq FROM jobs ORDER BY created_at DESC, seq DESC
                        LIMIT -1 OFFSET {JOBS_KEPT})""",
                    _UNFINISHED,
                )

    def job(self, job_id: str) -> JobState | None:
        """One job of the history (the newest JOBS_KEPT), by its id."""
        with self._locked() as db:
            row = db.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else self._decode_job(job_id, row[0])

    def recent_jobs(self, limit: int) -> list[JobState]:
        """The newest ``limit`` jobs of the history, newest first."""
        with self._locked() as db:
            rows = db.execute(
                "SELECT job_id, body FROM jobs ORDER BY created_at DESC, seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        jobs = (self._decode_job(job_id, body) for job_id, body in rows)
        return [job for job in jobs if job is not None]

    def fail_interrupted_jobs(self, reason: str, at: datetime) -> list[JobState]:
        """Mark every queued or running job failed (an ``internal`` error saying
        ``reason``) and return them, oldest first, for the agent to publish."""
        failed: list[JobState] = []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT job_id, body FROM jobs WHERE state IN (?, ?) ORDER BY created_at, seq",
                _UNFINISHED,
            ).fetchall()
            for job_id, body in rows:
                job = self._decode_job(job_id, body)
                if job is None:
                    # Unreadable: at least stop it counting as unfinished.
                    db.execute(
                        "UPDATE jobs SET state = ?, finished_at = ? WHERE job_id = ?",
                        (JobStatus.FAILED.value, at.timestamp(), job_id),
                    )
                    continue
                job = job.model_copy(
                    update={
                        "state": JobStatus.FAILED,
                        "phase": JobPhase.DONE,
                        "finished_at": at,
                        "eta_s": None,
                        "queue_position": None,
                        "message": reason,
                        "error": ErrorInfo(code=ErrorCode.INTERNAL, message=reason),
                        "ts": at,
                    }
                )
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, body = ? WHERE job_id = ?",
                    (job.state.value, at.timestamp(), job.model_dump_json(), job_id),
                )
                failed.append(job)
        return failed

    # ---- plumbing --------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._connection is None:
                raise StoreError(f"the state database {self.path} is already closed")
            try:
                yield self._connection
            except sqlite3.Error as exc:
                raise StoreError(
                    f"the state database {self.path} failed ({exc}); check the disk, "
                    "and if the file is damaged move it away and restart the agent"
                ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as db:
            # IMMEDIATE takes the write lock up front, so a busy file fails (after the
            # busy timeout) at BEGIN instead of half-way through.
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                # SQLite rolls some errors back itself; a second ROLLBACK would then
                # raise and hide the original error.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _decode_job(self, job_id: str, body: str) -> JobState | None:
        try:
            return JobState.model_validate_json(body)
        except ValidationError as exc:
            # History is not worth refusing to start over; skip the row and say so.
            log.warning(
                "skipping job %s in %s: it no longer validates (%s)", job_id, self.path, exc
            )
            return None


_FACTS_QUERY = (
    "SELECT model, last_vram_mb, load_s_avg, load_count, last_loaded_at, wake_s, sleep_ram_mb "
    "FROM models"
)


def _facts(row: tuple[Any, ...]) -> ModelFacts:
    return ModelFacts(*row)


def _job_row(job: JobState) -> tuple[str, str, str | None, str, float, float | None, str]:
    return (
        job.job_id,
        job.command,
        job.model,
        job.state.value,
        job.created_at.timestamp(),
        None if job.finished_at is None else job.finished_at.timestamp(),
        job.model_dump_json(),
    )


def _prepare(connection: sqlite3.Connection, path: Path) -> None:
    """Check the file, set the connection up and migrate; sqlite3 errors propagate."""
    connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # The first read of the header: a file that is not SQLite fails here.
    version = _user_version(connection)
    if version > SCHEMA_VERSION:
        raise _too_new(path, version)
    (check,) = connection.execute("PRAGMA quick_check").fetchone()
    if check != "ok":
        raise sqlite3.DatabaseError(f"integrity check failed: {check}")
    # WAL: readers never block the writer, and with synchronous=NORMAL a commit needs no
    # fsync (a power cut can lose the last commits, never corrupt the file), which keeps
    # the frequent small job updates cheap.
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    if version == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = _user_version(connection)
        if version > SCHEMA_VERSION:
            raise _too_new(path, version)
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                connection.execute(statement)
            log.info("migrated %s to schema version %d", path, step + 1)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _user_version(connection: sqlite3.Connection) -> int:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    return int(version)


def _too_new(path: Path, version: int) -> StoreError:
    return StoreError(
        f"the state database {path} has schema version {version}, newer than the "
        f"{SCHEMA_VERSION} this modelbus knows; upgrade modelbus or move the file away"
    )


def _unusable(path: Path, exc: sqlite3.Error) -> StoreError:
    return StoreError(
        f"cannot use the state database {path} ({exc}); if it is damaged, move it away "
        "and restart the agent to begin with an empty one"
    )

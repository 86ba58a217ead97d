"""The agent's SQLite state: facts, loads and jobs survive a restart; bad files refuse."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import database as store_module
from agent.database import (
    JOBS_KEPT,
    LOADS_KEPT_PER_MODEL,
    SCHEMA_VERSION,
    Database,
    ModelFacts,
    RecordedLoad,
    StoreError,
)
from shared.messages import ErrorCode, ErrorInfo, JobPhase, JobState, JobStatus

T0 = datetime(2025, 1, 1, tzinfo=UTC)
RESTART = "the agent restarted while this job was running"


def job(
    job_id: str,
    *,
    minutes: float = 0,
    state: JobStatus = JobStatus.SUCCEEDED,
    phase: JobPhase = JobPhase.DONE,
    model: str | None = "whisperx",
    **fields: object,
) -> JobState:
    created = T0 + timedelta(minutes=minutes)
    return JobState.model_validate(
        {
            "job_id": job_id,
            "command": "load",
            "model": model,
            "state": state,
            "phase": phase,
            "created_at": created,
            "ts": created,
            **fields,
        }
    )


def saved_jobs(db_path: Path) -> list[JobState]:
    """The job rows as the file holds them, newest first, read past the product's API."""
    connection = sqlite3.connect(db_path)
    try:
        rows = connection.execute("SELECT body FROM jobs ORDER BY created_at DESC, seq DESC")
        return [JobState.model_validate_json(body) for (body,) in rows.fetchall()]
    finally:
        connection.close()


def saved_job(db_path: Path, job_id: str) -> JobState | None:
    return next((j for j in saved_jobs(db_path) if j.job_id == job_id), None)


def kept_loads(db_path: Path, model: str) -> list[tuple[int | None, float, float]]:
    connection = sqlite3.connect(db_path)
    try:
        rows = connection.execute(
            "SELECT vram_mb, load_s, at FROM loads WHERE model = ? ORDER BY id", (model,)
        )
        return [(vram, load_s, at) for vram, load_s, at in rows.fetchall()]
    finally:
        connection.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A nested directory proves open() creates it.
    return tmp_path / "state" / "nested" / "modelbus.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Database]:
    with Database.open(db_path) as opened:
        yield opened


# ---- opening -----------------------------------------------------------------------------


def test_open_creates_the_file_in_wal_mode_at_the_current_version(db_path: Path) -> None:
    with Database.open(db_path):
        pass
    assert db_path.is_file()
    connection = sqlite3.connect(db_path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        connection.close()
    assert SCHEMA_VERSION >= 1


def test_reopening_a_current_database_keeps_its_data(db_path: Path) -> None:
    for at in (5.0, 6.0):  # the second open must not re-run the migrations
        with Database.open(db_path) as store:
            store.record_load("whisperx", 6000, 1.0, at=at)
    with Database.open(db_path) as store:
        facts = store.model_facts("whisperx")
    assert facts is not None and (facts.load_count, facts.last_loaded_at) == (2, 6.0)


def test_a_later_migration_is_applied_to_an_older_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Database.open(db_path) as store:
        store.record_load("whisperx", 6000, 1.0, at=1.0)
    extra = ("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",)
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, extra))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Database.open(db_path) as store:
        assert store.model_facts("whisperx") is not None
    connection = sqlite3.connect(db_path)
    try:
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert connection.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    finally:
        connection.close()


def test_a_corrupt_file_is_refused_naming_it(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite at all \x00\xff" * 200)
    with pytest.raises(StoreError) as caught:
        Database.open(db_path)
    message = str(caught.value)
    assert str(db_path) in message
    assert "move it away" in message


def test_a_damaged_page_is_refused(db_path: Path) -> None:
    with Database.open(db_path) as store:
        for index in range(200):
            store.save_job(job(f"job-{index}", minutes=index, message="x" * 200))
    connection = sqlite3.connect(db_path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    data = bytearray(db_path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page_size
    # Scribble over everything after the first page (the schema stays readable).
    data[page_size:] = b"\xa5" * (len(data) - page_size)
    db_path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(db_path)):
        Database.open(db_path)


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with Database.open(db_path):
        pass
    connection = sqlite3.connect(db_path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StoreError, match="newer") as caught:
        Database.open(db_path)
    assert str(db_path) in str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(caught.value)


def test_an_unwritable_state_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="state directory"):
        Database.open(blocker / "modelbus.db")


def test_calls_after_close_say_so(store: Database) -> None:
    store.close()
    store.close()  # twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.model_facts("whisperx")


# ---- model facts -------------------------------------------------------------------------


def test_unknown_model_has_no_facts(store: Database) -> None:
    assert store.model_facts("nope") is None


def test_load_time_is_an_exponentially_weighted_average(store: Database) -> None:
    store.record_load("whisperx", 6000, 10.0, at=100.0)
    assert store.model_facts("whisperx") == ModelFacts(
        "whisperx", 6000, 10.0, 1, last_loaded_at=100.0
    )
    store.record_load("whisperx", 6100, 20.0, at=200.0)
    facts = store.model_facts("whisperx")
    assert facts is not None
    assert facts.load_s == pytest.approx(13.0)  # 0.3 * 20 + 0.7 * 10
    assert (facts.vram_mb, facts.load_count, facts.last_loaded_at) == (6100, 2, 200.0)
    store.record_load("whisperx", 6100, 3.0, at=300.0)
    facts = store.model_facts("whisperx")
    assert facts is not None and facts.load_s == pytest.approx(10.0)  # 0.3 * 3 + 0.7 * 13


def test_an_unmeasured_load_keeps_the_last_vram(store: Database) -> None:
    store.record_load("whisperx", 6000, 10.0, at=1.0)
    store.record_load("whisperx", None, 10.0, at=2.0)
    facts = store.model_facts("whisperx")
    assert facts is not None and facts.vram_mb == 6000 and facts.load_count == 2


def test_a_nonsense_load_time_is_rejected(store: Database) -> None:
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="load time"):
            store.record_load("whisperx", 1, bad, at=1.0)
    assert store.model_facts("whisperx") is None


def test_facts_survive_a_reopen(db_path: Path) -> None:
    with Database.open(db_path) as store:
        store.record_load("whisperx", 6000, 10.0, at=1.0)
        store.record_load("whisperx", 6000, 20.0, at=2.0)
        store.record_load("ovi-11b", 22000, 40.0, at=3.0)
    with Database.open(db_path) as store:
        facts = {name: store.model_facts(name) for name in ("ovi-11b", "whisperx")}
    assert facts == {
        "ovi-11b": ModelFacts("ovi-11b", 22000, 40.0, 1, 3.0),
        "whisperx": ModelFacts("whisperx", 6000, 13.0, 2, 2.0),  # 0.3 * 20 + 0.7 * 10
    }


def test_only_the_newest_loads_are_kept_per_model(store: Database, db_path: Path) -> None:
    total = LOADS_KEPT_PER_MODEL + 20
    for index in range(total):
        store.record_load("whisperx", index, 1.0, at=float(index))
    store.record_load("ovi-11b", 1, 1.0, at=0.0)
    history = kept_loads(db_path, "whisperx")
    assert len(history) == LOADS_KEPT_PER_MODEL
    assert history[0] == (20, 1.0, 20.0) and history[-1] == (total - 1, 1.0, total - 1.0)
    assert kept_loads(db_path, "ovi-11b") == [(1, 1.0, 0.0)]
    facts = store.model_facts("whisperx")
    assert facts is not None and facts.load_count == total  # the summary counts all


def test_recent_loads_are_each_models_newest_first(store: Database) -> None:
    for index in range(LOADS_KEPT_PER_MODEL + 5):
        store.record_load("whisperx", index, index / 10, at=1000.0 + index)
    store.record_load("ovi-11b", None, 40.0, at=5.0)
    store.record_load("ovi-11b", 22000, 38.5, at=9.0)
    newest = LOADS_KEPT_PER_MODEL + 4
    assert store.recent_loads(2) == [
        RecordedLoad("ovi-11b", 22000, 38.5, 9.0),
        RecordedLoad("ovi-11b", None, 40.0, 5.0),
        RecordedLoad("whisperx", newest, newest / 10, 1000.0 + newest),
        RecordedLoad("whisperx", newest - 1, (newest - 1) / 10, 1000.0 + newest - 1),
    ]
    only = store.recent_loads(LOADS_KEPT_PER_MODEL, "whisperx")
    assert len(only) == LOADS_KEPT_PER_MODEL and {row.model for row in only} == {"whisperx"}
    assert [row.vram_mb for row in only] == list(range(newest, newest - LOADS_KEPT_PER_MODEL, -1))
    assert store.recent_loads(5, "never-loaded") == []


def test_concurrent_loads_from_many_threads_are_all_counted(store: Database, db_path: Path) -> None:
    threads, per_thread = 8, 50
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for index in range(per_thread):
                store.record_load(f"model-{worker % 2}", worker, 10.0, at=float(index))
                store.model_facts(f"model-{worker % 2}")
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(worker,)) for worker in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    facts = {name: store.model_facts(name) for name in ("model-0", "model-1")}
    assert {name: f.load_count for name, f in facts.items() if f} == {
        "model-0": threads // 2 * per_thread,
        "model-1": threads // 2 * per_thread,
    }
    assert all(f is not None and f.load_s == pytest.approx(10.0) for f in facts.values())
    assert len(kept_loads(db_path, "model-0")) == LOADS_KEPT_PER_MODEL


# ---- jobs --------------------------------------------------------------------------------


def test_job_round_trip_and_upsert(store: Database, db_path: Path) -> None:
    assert saved_job(db_path, "a") is None
    queued = job("a", state=JobStatus.QUEUED, phase=JobPhase.QUEUED, queue_position=1)
    store.save_job(queued)
    assert saved_job(db_path, "a") == queued
    done = job(
        "a",
        progress=1.0,
        finished_at=T0 + timedelta(seconds=42),
        result={"model": "whisperx", "freed_mb": 1024},
    )
    store.save_job(done)
    assert saved_jobs(db_path) == [done]
    # What the HTTP API reads for a job the bus no longer retains.
    assert store.job("a") == done
    assert store.job("b") is None


def test_interrupted_jobs_are_failed_and_stay_failed(db_path: Path) -> None:
    at = T0 + timedelta(hours=1)
    with Database.open(db_path) as store:
        store.save_job(job("done", minutes=0))
        store.save_job(
            job("running", minutes=1, state=JobStatus.RUNNING, phase=JobPhase.LOADING, eta_s=9.0)
        )
        store.save_job(
            job(
                "queued", minutes=2, state=JobStatus.QUEUED, phase=JobPhase.QUEUED, queue_position=1
            )
        )
        failed = store.fail_interrupted_jobs(RESTART, at)
        assert [j.job_id for j in failed] == ["running", "queued"]
        for failed_job in failed:
            assert failed_job.state == JobStatus.FAILED
            assert failed_job.phase == JobPhase.DONE
            assert failed_job.finished_at == at and failed_job.ts == at
            assert failed_job.error == ErrorInfo(code=ErrorCode.INTERNAL, message=RESTART)
            assert failed_job.eta_s is None and failed_job.queue_position is None
        assert store.fail_interrupted_jobs(RESTART, at) == []
    with Database.open(db_path) as store:
        assert store.fail_interrupted_jobs(RESTART, at) == []
    reread = saved_job(db_path, "running")
    assert reread == failed[0]
    assert reread is not None and reread.model == "whisperx"
    done = saved_job(db_path, "done")
    assert done is not None and done.state == JobStatus.SUCCEEDED and done.error is None


def test_history_keeps_the_newest_jobs_but_never_an_unfinished_one(
    store: Database, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "JOBS_KEPT", 10)
    store.save_job(job("old-running", minutes=-1, state=JobStatus.RUNNING, phase=JobPhase.LOADING))
    for index in range(25):
        store.save_job(job(f"job-{index:02}", minutes=index))
    kept = [j.job_id for j in saved_jobs(db_path)]
    assert kept == [f"job-{index:02}" for index in range(24, 14, -1)] + ["old-running"]
    # GET /api/v1/history reads the same, newest first.
    assert [j.job_id for j in store.recent_jobs(3)] == ["job-24", "job-23", "job-22"]
    assert [j.job_id for j in store.recent_jobs(100)] == kept


def test_history_is_pruned_at_the_real_limit(store: Database, db_path: Path) -> None:
    for index in range(JOBS_KEPT + 5):
        store.save_job(job(f"job-{index:04}", minutes=index))
    kept = saved_jobs(db_path)
    assert len(kept) == JOBS_KEPT
    assert kept[0].job_id == f"job-{JOBS_KEPT + 4:04}" and kept[-1].job_id == "job-0005"


def test_a_job_row_that_no_longer_validates_is_skipped(store: Database, db_path: Path) -> None:
    store.save_job(job("good", minutes=1))
    store.save_job(job("bad", minutes=2, state=JobStatus.RUNNING, phase=JobPhase.LOADING))
    connection = sqlite3.connect(db_path)
    connection.execute("UPDATE jobs SET body = '{\"job_id\": \"bad\"}' WHERE job_id = 'bad'")
    connection.commit()
    connection.close()
    # Unreadable: not failed again as interrupted (there is nothing to publish), but no
    # longer counted as running either.
    assert store.fail_interrupted_jobs(RESTART, T0) == []
    assert store.fail_interrupted_jobs(RESTART, T0) == []
    connection = sqlite3.connect(db_path)
    states = dict(connection.execute("SELECT job_id, state FROM jobs").fetchall())
    connection.close()
    assert states == {"good": "succeeded", "bad": "failed"}


def test_a_version_1_database_loses_only_what_nothing_read(db_path: Path) -> None:
    """An agent of an earlier release left instances and last-use times: migration 2
    drops them and keeps the facts and jobs."""
    db_path.parent.mkdir(parents=True)
    connection = sqlite3.connect(db_path)
    for statement in store_module.MIGRATIONS[0]:
        connection.execute(statement)
    connection.execute(
        "INSERT INTO models (model, last_vram_mb, load_s_avg, load_count, last_loaded_at,"
        " last_used_at) VALUES ('whisperx', 6000, 4.0, 3, 10.0, 20.0)"
    )
    connection.execute("INSERT INTO instances (model, data) VALUES ('whisperx', '{}')")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    with Database.open(db_path) as store:
        assert store.model_facts("whisperx") == ModelFacts("whisperx", 6000, 4.0, 3, 10.0)
    connection = sqlite3.connect(db_path)
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert "instances" not in tables and {"models", "loads", "jobs"} <= tables


def test_what_sleeping_taught_is_kept_beside_the_loads(db_path: Path) -> None:
    with Database.open(db_path) as store:
        store.record_sleep("vllm-a", 20480)  # asleep before any load this store saw
        store.record_load("vllm-a", 30000, 48.0, 100.0)
        store.record_wake("vllm-a", 2.5)
        store.record_wake("vllm-a", 1.5)
        with pytest.raises(ValueError, match="finite"):
            store.record_wake("vllm-a", float("nan"))
        facts = store.model_facts("vllm-a")
    assert facts == ModelFacts("vllm-a", 30000, 48.0, 1, 100.0, wake_s=1.5, sleep_ram_mb=20480)
    with Database.open(db_path) as store:  # and after a restart
        assert store.model_facts("vllm-a") == facts

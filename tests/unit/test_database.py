"""The agent's SQLite state: facts, jobs and instances survive a restart; bad files refuse."""

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
    for _ in range(2):  # the second open must not re-run the migrations
        with Database.open(db_path) as store:
            store.record_usage("whisperx", 5.0)
    with Database.open(db_path) as store:
        facts = store.model_facts("whisperx")
    assert facts is not None and facts.last_used_at == 5.0


def test_a_later_migration_is_applied_to_an_older_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Database.open(db_path) as store:
        store.record_usage("whisperx", 1.0)
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
    assert store.all_model_facts() == {}


def test_load_time_is_an_exponentially_weighted_average(store: Database) -> None:
    store.record_load("whisperx", 6000, 10.0, at=100.0)
    assert store.model_facts("whisperx") == ModelFacts(
        "whisperx", 6000, 10.0, 1, last_loaded_at=100.0, last_used_at=None
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


def test_usage_and_loads_are_independent(store: Database) -> None:
    store.record_usage("ovi-11b", 50.0)
    assert store.model_facts("ovi-11b") == ModelFacts("ovi-11b", None, None, 0, None, 50.0)
    store.record_load("ovi-11b", 22000, 30.0, at=60.0)
    store.record_usage("ovi-11b", 70.0)
    assert store.model_facts("ovi-11b") == ModelFacts("ovi-11b", 22000, 30.0, 1, 60.0, 70.0)


def test_facts_survive_a_reopen(db_path: Path) -> None:
    with Database.open(db_path) as store:
        store.record_load("whisperx", 6000, 10.0, at=1.0)
        store.record_load("whisperx", 6000, 20.0, at=2.0)
        store.record_load("ovi-11b", 22000, 40.0, at=3.0)
        store.record_usage("whisperx", 9.0)
    with Database.open(db_path) as store:
        facts = store.all_model_facts()
    assert facts == {
        "ovi-11b": ModelFacts("ovi-11b", 22000, 40.0, 1, 3.0, None),
        "whisperx": ModelFacts("whisperx", 6000, 13.0, 2, 2.0, 9.0),  # 0.3 * 20 + 0.7 * 10
    }


def test_only_the_newest_loads_are_kept_per_model(store: Database) -> None:
    total = LOADS_KEPT_PER_MODEL + 20
    for index in range(total):
        store.record_load("whisperx", index, 1.0, at=float(index))
    store.record_load("ovi-11b", 1, 1.0, at=0.0)
    history = store.load_history("whisperx")
    assert len(history) == LOADS_KEPT_PER_MODEL
    assert history[0] == (20, 1.0, 20.0) and history[-1] == (total - 1, 1.0, total - 1.0)
    assert store.load_history("ovi-11b") == [(1, 1.0, 0.0)]
    facts = store.model_facts("whisperx")
    assert facts is not None and facts.load_count == total  # the summary counts all


def test_concurrent_loads_from_many_threads_are_all_counted(store: Database) -> None:
    threads, per_thread = 8, 50
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for index in range(per_thread):
                store.record_load(f"model-{worker % 2}", worker, 10.0, at=float(index))
                store.record_usage(f"model-{worker % 2}", float(index))
                store.model_facts(f"model-{worker % 2}")
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(worker,)) for worker in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    facts = store.all_model_facts()
    assert {name: f.load_count for name, f in facts.items()} == {
        "model-0": threads // 2 * per_thread,
        "model-1": threads // 2 * per_thread,
    }
    assert all(f.load_s == pytest.approx(10.0) for f in facts.values())
    assert len(store.load_history("model-0")) == LOADS_KEPT_PER_MODEL


# ---- jobs --------------------------------------------------------------------------------


def test_job_round_trip_and_upsert(store: Database) -> None:
    assert store.get_job("a") is None
    queued = job("a", state=JobStatus.QUEUED, phase=JobPhase.QUEUED, queue_position=1)
    store.save_job(queued)
    assert store.get_job("a") == queued
    done = job(
        "a",
        progress=1.0,
        finished_at=T0 + timedelta(seconds=42),
        result={"model": "whisperx", "freed_mb": 1024},
    )
    store.save_job(done)
    assert store.get_job("a") == done
    assert store.recent_jobs() == [done]


def test_recent_jobs_are_newest_first_and_limited(store: Database) -> None:
    # Saved out of order; same-instant jobs keep the order they were first saved in.
    for job_id, minutes in [("b", 2), ("a", 1), ("d", 3), ("c", 3)]:
        store.save_job(job(job_id, minutes=minutes))
    assert [j.job_id for j in store.recent_jobs()] == ["c", "d", "b", "a"]
    assert [j.job_id for j in store.recent_jobs(limit=2)] == ["c", "d"]
    assert store.recent_jobs(limit=0) == []
    with pytest.raises(ValueError):
        store.recent_jobs(limit=-1)


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
        assert [j.job_id for j in store.unfinished_jobs()] == ["running", "queued"]
        failed = store.fail_interrupted_jobs(RESTART, at)
        assert [j.job_id for j in failed] == ["running", "queued"]
        for failed_job in failed:
            assert failed_job.state == JobStatus.FAILED
            assert failed_job.phase == JobPhase.DONE
            assert failed_job.finished_at == at and failed_job.ts == at
            assert failed_job.error == ErrorInfo(code=ErrorCode.INTERNAL, message=RESTART)
            assert failed_job.eta_s is None and failed_job.queue_position is None
        assert store.unfinished_jobs() == []
        assert store.fail_interrupted_jobs(RESTART, at) == []
    with Database.open(db_path) as store:
        assert store.unfinished_jobs() == []
        reread = store.get_job("running")
        assert reread == failed[0]
        assert reread is not None and reread.model == "whisperx"
        done = store.get_job("done")
        assert done is not None and done.state == JobStatus.SUCCEEDED and done.error is None


def test_history_keeps_the_newest_jobs_but_never_an_unfinished_one(
    store: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "JOBS_KEPT", 10)
    store.save_job(job("old-running", minutes=-1, state=JobStatus.RUNNING, phase=JobPhase.LOADING))
    for index in range(25):
        store.save_job(job(f"job-{index:02}", minutes=index))
    kept = [j.job_id for j in store.recent_jobs(limit=100)]
    assert kept == [f"job-{index:02}" for index in range(24, 14, -1)] + ["old-running"]


def test_history_is_pruned_at_the_real_limit(store: Database) -> None:
    for index in range(JOBS_KEPT + 5):
        store.save_job(job(f"job-{index:04}", minutes=index))
    kept = store.recent_jobs(limit=JOBS_KEPT + 100)
    assert len(kept) == JOBS_KEPT
    assert kept[0].job_id == f"job-{JOBS_KEPT + 4:04}" and kept[-1].job_id == "job-0005"
    assert store.get_job("job-0004") is None


def test_a_job_row_that_no_longer_validates_is_skipped(store: Database, db_path: Path) -> None:
    store.save_job(job("good", minutes=1))
    store.save_job(job("bad", minutes=2, state=JobStatus.RUNNING, phase=JobPhase.LOADING))
    connection = sqlite3.connect(db_path)
    connection.execute("UPDATE jobs SET body = '{\"job_id\": \"bad\"}' WHERE job_id = 'bad'")
    connection.commit()
    connection.close()
    assert store.get_job("bad") is None
    assert [j.job_id for j in store.recent_jobs()] == ["good"]
    assert store.fail_interrupted_jobs(RESTART, T0) == []
    assert store.unfinished_jobs() == []


# ---- instances ---------------------------------------------------------------------------


def test_instances_round_trip_and_survive_a_reopen(db_path: Path) -> None:
    with Database.open(db_path) as store:
        assert store.instances() == {}
        store.save_instance("whisperx", {"pid": 123, "port": 8001, "gpus": [0]})
        store.save_instance("ovi-11b", {"container": "mb-ovi", "gpus": [0, 1]})
        store.save_instance("whisperx", {"pid": 456, "port": 8001, "gpus": [1]})
    with Database.open(db_path) as store:
        assert store.instances() == {
            "ovi-11b": {"container": "mb-ovi", "gpus": [0, 1]},
            "whisperx": {"pid": 456, "port": 8001, "gpus": [1]},
        }
        store.remove_instance("ovi-11b")
        store.remove_instance("never-saved")
        assert list(store.instances()) == ["whisperx"]

"""Rendering helpers of the TUI: VRAM bars, job rows and short figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from rich.text import Text

from shared.messages import (
    GpuProcess,
    GpuState,
    InstalledWeights,
    JobPhase,
    JobState,
    JobStatus,
    ModelLifecycle,
    ModelState,
    PartialWeights,
    WeightsState,
)
from shared.replies import LoadRecord, ModelLoads
from tui.format import ago, duration, gib, printable, size, used_of_total
from tui.memory import Segment
from tui.widgets.jobs import (
    FADE_AFTER_S,
    job_row,
    progress_bar,
    render_job_detail,
    visible_jobs,
)
from tui.widgets.keybar import Key, key_bar
from tui.widgets.models import render_loads, render_model_detail
from tui.widgets.outcome import Said, render_said
from tui.widgets.sparkline import sparkline
from tui.widgets.tables import fit_last_column
from tui.widgets.vram_bar import (
    FREE_GLYPH,
    OTHER_GLYPH,
    render_bar,
    render_gpu,
    render_processes,
)
from tui.widgets.weights import PARTIAL_MARK, disk_summary, weights_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_bar_splits_cells_in_proportion_with_distinct_glyphs() -> None:
    segments = [
        Segment("a", 16384),
        Segment("b", 8192),
        Segment("other", 4096),
        Segment("free", 4096),
    ]
    bar = render_bar(segments, 32).plain
    assert bar == "█" * 16 + "▓" * 8 + OTHER_GLYPH * 4 + FREE_GLYPH * 4


def test_a_small_model_still_gets_a_cell() -> None:
    bar = render_bar([Segment("big", 32000), Segment("tiny", 10), Segment("free", 758)], 20).plain
    assert "▓" in bar and len(bar) == 20


@given(
    st.lists(st.integers(min_value=0, max_value=100_000), min_size=1, max_size=10),
    st.integers(min_value=1, max_value=200),
)
def test_bar_always_fills_exactly_its_width(sizes: list[int], width: int) -> None:
    segments = [Segment(f"m{i}", mb) for i, mb in enumerate(sizes)]
    assert len(render_bar(segments, width).plain) == width


def test_gpu_panel_lines_carry_figures_and_legend() -> None:
    gpu = GpuState(
        index=1,
        name="Sim",
        memory_total_mb=32768,
        memory_used_mb=24576,
        utilization_percent=40,
        temperature_c=61,
        power_w=280,
        power_limit_w=575,
        processes=[
            GpuProcess(pid=1, used_mb=17408, model="qwen3-vl-30b"),
            GpuProcess(pid=2, used_mb=6144, model="whisperx"),
            GpuProcess(pid=3, used_mb=1024),
        ],
        alerts=["vram_high"],
        ts=T0,
    )
    lines = render_gpu(gpu, 60).plain.splitlines()
    assert lines[0].startswith("GPU1 [") and lines[0].endswith("] 24.0/32.0G")
    assert len(lines[0]) == 60
    assert "util 40%  61°C  280/575W" in lines[1] and "⚠ vram_high" in lines[1]
    assert lines[2].split() == [
        "█",
        "qwen3-vl-30b",
        "17.0G",
        "▓",
        "whisperx",
        "6.0G",
        OTHER_GLYPH,
        "other",
        "1.0G",
    ]


def job(state: JobStatus, finished_s_ago: float | None) -> JobState:
    finished = T0 - timedelta(seconds=finished_s_ago) if finished_s_ago is not None else None
    return JobState(
        job_id=f"j{state.value}{finished_s_ago}",
        command="switch",
        model="m",
        state=state,
        phase=JobPhase.DONE if finished else JobPhase.LOADING,
        created_at=T0 - timedelta(minutes=5),
        finished_at=finished,
        ts=T0,
    )


def test_finished_jobs_fade_out() -> None:
    running = job(JobStatus.RUNNING, None)
    recent = job(JobStatus.SUCCEEDED, 1)
    old = job(JobStatus.FAILED, FADE_AFTER_S + 1)
    assert visible_jobs([running, recent, old], T0) == [running, recent]


def test_progress_bar_and_figures() -> None:
    assert progress_bar(0.5, 10) == "━━━━━╌╌╌╌╌  50%"
    assert gib(17408) == "17.0G" and gib(None) == "?"
    assert used_of_total(1024, 32768) == "1.0/32.0G"
    assert [duration(s) for s in (None, 5, 65, 7260, 200000)] == [
        "-",
        "5s",
        "1m05s",
        "2h01m",
        "2d7h",
    ]
    assert ago(T0 - timedelta(seconds=90), T0) == "1m30s" and ago(None, T0) == "-"


def test_a_download_row_says_how_much_of_how_much() -> None:
    download = JobState(
        job_id="d1",
        command="install",
        model="tiny",
        repo="acme/tiny",
        state=JobStatus.RUNNING,
        phase=JobPhase.DOWNLOADING,
        progress=0.25,
        eta_s=12,
        bytes_done=1024 * 1024 * 1024,
        bytes_total=4 * 1024 * 1024 * 1024,
        message="downloading acme/tiny@abc",
        created_at=T0,
        ts=T0,
    )
    cells = [str(cell) for cell in job_row(download)]
    assert cells[0] == "install tiny"
    assert cells[2].endswith(" 25%") and cells[3] == "12s"
    assert cells[4].startswith("1.0G/4.0G downloading")
    assert size(300 * 1024 * 1024) == "300M" and size(0) == "0M"


def test_processes_are_listed_largest_first_with_what_they_belong_to() -> None:
    gpu = GpuState(
        index=0,
        processes=[
            GpuProcess(pid=7, used_mb=1024, name="python3"),
            GpuProcess(pid=42, used_mb=17408, name="llama-server", model="qwen"),
            GpuProcess(pid=9, used_mb=6144, name="whisperx", model="wx", container="wx-1"),
        ],
        ts=T0,
    )
    lines = render_processes(gpu).plain.splitlines()
    assert [line.split()[0] for line in lines] == ["42", "9", "7"]
    assert lines[0].endswith("qwen") and "17.0G" in lines[0]
    assert lines[1].endswith("wx (container wx-1)")
    assert lines[2].endswith("not managed") and "python3" in lines[2]
    assert "no processes" in render_processes(GpuState(index=1, ts=T0)).plain


def test_a_stopping_model_is_drawn_by_name_and_its_own_glyph() -> None:
    gpu = GpuState(index=0, memory_total_mb=8192, memory_used_mb=6144, ts=T0)
    text = render_gpu(gpu, 60, {"whisperx": 6144}).plain
    assert "░" in text.splitlines()[0] and "whisperx 6.0G stopping" in text
    assert "other" not in text


def test_a_jobs_detail_has_its_whole_error_and_what_it_took() -> None:
    message = "the server exited during its health check: " + "x" * 120
    failed = JobState.model_validate(
        {
            "job_id": "f1",
            "command": "switch",
            "model": "qwen",
            "state": "failed",
            "phase": "done",
            "created_at": T0,
            "started_at": T0,
            "finished_at": T0 + timedelta(seconds=75),
            "error": {"code": "load_failed", "message": message, "details": {"exit_code": 1}},
            "ts": T0,
        }
    )
    text = render_job_detail(failed).plain
    assert text.startswith("switch qwen  job f1")
    assert f"load_failed: {message}" in text  # in full, not cut as in the table
    assert "exit_code  1" in text and "took  1m15s" in text


def test_a_sparkline_shows_each_slices_highest_value_and_blanks_before_the_start() -> None:
    points = [(0.0, 0.0), (10.0, 1.0), (12.0, 0.2), (25.0, 0.5), (39.0, None)]
    assert sparkline(points, 40.0, 40.0, 4) == "▁█▅ "
    # A TUI that started 10 s ago shows those 10 s at the right, nothing before.
    assert sparkline([(35.0, 0.5)], 40.0, 40.0, 4) == "   ▅"
    assert sparkline([(-100.0, 1.0)], 40.0, 40.0, 4) == "    "  # older than the window
    assert sparkline(points, 40.0, 40.0, 0) == ""


def test_a_models_detail_has_its_whole_error_and_its_traffic() -> None:
    error = "health check failed 3 times: " + "connection refused " * 8
    model = ModelState(
        name="qwen",
        runtime="docker",
        state=ModelLifecycle.CRASHED,
        gpus=[0, 1],
        vram_estimate_mb=17408,
        error=error,
        aliases=["org/qwen-30b"],
        requests_total=42,
        waiting=3,
        last_load_s=31.25,
        ts=T0,
    )
    text = render_model_detail(model, T0).plain
    assert text.startswith("qwen  ✖ crashed")
    assert error in text  # in full, not cut as in the table
    for line in ("aliases  org/qwen-30b", "gpus  0,1", "requests  42", "queued  3", "31.2 s"):
        assert line in text, line
    assert "in flight" not in text  # nothing to say: left out


def test_the_key_bar_keeps_keys_whole_and_always_shows_help_and_quit() -> None:
    keys = [Key("s", "switch"), Key("x", "uninstall"), Key("g", "procs")]
    always = [Key("?", "keys"), Key("q", "quit")]
    assert key_bar(keys, always, 80).plain == "s switch x uninstall g procs ? keys q quit"
    # 33 columns: "x uninstall" does not fit; the smaller "g procs" after it still does.
    assert key_bar(keys, always, 33).plain == "s switch g procs ? keys q quit"
    assert key_bar(keys, always, 5).plain == "? keys q quit"


def test_the_last_column_is_cut_to_the_tables_width() -> None:
    rows = [("a", ["job one", Text("a long message that goes on")]), ("b", ["j", "short"])]
    fitted = fit_last_column(("Job", "Phase"), rows, width=24)
    # "job one" is 7 wide; each of the two columns has 1 cell of padding either side.
    assert [str(cells[-1]) for _, cells in fitted] == ["a long messa…", "short"]
    assert fit_last_column(("Job", "Phase"), rows, width=1000)[0][1][-1].plain.endswith("on")


def test_the_weights_panel_lists_installed_then_partial_weights() -> None:
    weights = WeightsState(
        weights=[
            InstalledWeights(name="b--two", repo="b/two", size_mb=2950, path="/w/b", used_by=[]),
            InstalledWeights(
                name="a--one", repo="a/one", size_mb=8, path="/w/a", used_by=["m1", "m2"]
            ),
        ],
        partial=[PartialWeights(name="c--three", repo="c/three", size_mb=512, path="/w/.p/c")],
        weights_dir="/w",
        used_mb=3470,
        disk_total_mb=1024 * 100,
        disk_free_mb=1024 * 40,
        ts=T0,
    )
    rows = weights_rows(weights, T0)
    assert [key for key, _ in rows] == ["a--one", "b--two", PARTIAL_MARK + "c--three"]
    assert [str(cell) for cell in rows[0][1][:3]] == ["a--one", "8M", "m1, m2"]
    assert [str(cell) for cell in rows[1][1][:3]] == ["b--two", "2.9G", "unused"]
    assert [str(cell) for cell in rows[2][1][:3]] == ["c--three", "512M", "partial download"]
    summary = disk_summary(weights).plain
    assert "40.0G free of 100.0G" in summary and "1 partial" in summary
    assert "not published" in disk_summary(None).plain
    assert weights_rows(None, T0) == []


def test_the_outcome_line_says_the_last_answer_on_one_line() -> None:
    said = Said(T0, "error", "gpu1: install", "install refused\n(invalid_payload):  bad")
    line = said.line().plain
    assert line.endswith("✖ gpu1: install: install refused (invalid_payload): bad")
    listing = render_said([said, Said(T0, "information", "", "Switch not sent.")]).plain
    assert "(2, newest first)" in listing and "Switch not sent." in listing


def test_text_from_elsewhere_loses_its_escape_sequences_and_controls() -> None:
    assert printable("a\x1b[2J\x1b[31mb") == "ab"
    assert printable("x\x1b]52;c;ZXZpbA==\x07y\x1b]0;title\x1b\\z") == "xyz"
    assert printable("nul\x00 bell\x07 c1\x9b end") == "nul bell c1 end"
    assert printable("two\nlines\tand a tab") == "two\nlines   and a tab"


def test_a_models_loads_read_as_blocks_and_lines() -> None:
    loads = ModelLoads(
        model="m",
        loads=[
            LoadRecord(loaded_at=T0 - timedelta(minutes=1), load_s=3.0, vram_used_mb=2048),
            LoadRecord(loaded_at=T0 - timedelta(minutes=9), load_s=6.0),
        ],
    )
    text = render_loads(loads, T0).plain
    assert "2 loads, 3.0 to 6.0 s" in text and "█▅" in text
    assert "1m00s ago     3.0 s  2.0G" in text
    instant = ModelLoads(model="m", loads=[LoadRecord(loaded_at=T0, load_s=0.0)])
    assert "1 load, 0.0 to 0.0 s" in render_loads(instant, T0).plain
    assert "never loaded" in render_loads(ModelLoads(model="m", loads=[]), T0).plain
    assert "refused" in render_loads("history refused (x): y", T0).plain

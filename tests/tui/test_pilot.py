"""The TUI driven by its keys (Textual's Pilot) against a real Mosquitto and a real
agent process running simulated model servers on a simulated 32 GB GPU."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Log

from devtools.brokers import MosquittoBroker, free_port
from shared.topics import CommandName, HostTopics
from tests.conftest import TEST_USERS
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import client_settings, watch
from tests.support.fake_hub import FakeHub
from tests.support.models import budget_catalog, sim_model
from tui.app import ModelbusApp, build_app
from tui.bridge import LinkState
from tui.command_keys import COMMAND_BINDINGS
from tui.screens import AskScreen, ConfirmScreen, DebugScreen, DetailScreen, LogScreen
from tui.widgets.hosts import HostList
from tui.widgets.jobs import JobsTable
from tui.widgets.models import ModelsTable
from tui.widgets.vram_bar import GpuPanel
from tui.widgets.weights import WeightsPanel

pytestmark = pytest.mark.broker
HOST = "lab"
# Sorted by name, as the models table shows them.
ROW = {"infinitetalk": 0, "ovi-11b": 1, "qwen3-vl-30b": 2, "wan2.1-14b": 3, "whisperx": 4}


async def until(pilot: Pilot[int], condition: Callable[[], object], timeout: float = 20) -> None:
    """Let the app run until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await pilot.pause(0.05)


def notes(app: ModelbusApp) -> list[str]:
    """What the outcome line has said, newest first."""
    return [f"{n.severity}: {n.title}: {n.message}" for n in app.outcome.said]


def gpu_text(app: ModelbusApp) -> str:
    return app.query_one(GpuPanel).render().plain


def model_state(app: ModelbusApp, name: str) -> str | None:
    view = app.store.host(HOST)
    model = view.models.get(name) if view else None
    return model.state.value if model else None


def model_names(app: ModelbusApp) -> list[str]:
    table = app.query_one(ModelsTable)
    return [str(key.value) for key in table.rows]


def row_text(app: ModelbusApp, name: str) -> str:
    table = app.query_one(ModelsTable)
    return " ".join(str(cell) for cell in table.get_row(name))


def pilot_agent(
    broker: MosquittoBroker, prefix: str, tmp_path: Path, models: dict[str, Any]
) -> AgentProcess:
    """An agent on HOST publishing every 0.2 s, with ``models`` in its catalog."""
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id=HOST,
        prefix=prefix,
        interval_s=0.2,
        models=models,
    )
    return AgentProcess(config)


@pytest.fixture
async def agent(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> AsyncIterator[AgentProcess]:
    catalog = budget_catalog(load_s=1.5)
    catalog["infinitetalk"]["pinned"] = True
    process = pilot_agent(broker, prefix, tmp_path, catalog)
    try:
        async with watch(broker.port, HostTopics(prefix, HOST).status) as bus:
            await bus.wait_topic(HostTopics(prefix, HOST).status, lambda _: True, timeout=20)
        yield process
    finally:
        process.close()


def tui(broker: MosquittoBroker, prefix: str, **settings: object) -> ModelbusApp:
    return build_app(client_settings(broker.port, **settings), prefix, host=HOST)


async def ready_dashboard(pilot: Pilot[int], app: ModelbusApp) -> None:
    await until(
        pilot, lambda: app.query_one(ModelsTable).row_count == 5 and "GPU0 [" in gpu_text(app)
    )


async def select(pilot: Pilot[int], app: ModelbusApp, model: str) -> None:
    app.query_one(ModelsTable).move_cursor(row=ROW[model])
    await pilot.pause()


async def load_by_key(pilot: Pilot[int], app: ModelbusApp, model: str) -> None:
    """Select ``model``, press l, and wait until it is ready."""
    await select(pilot, app, model)
    await pilot.press("l")
    await until(pilot, lambda: model_state(app, model) == "ready")


async def question_after(pilot: Pilot[int], app: ModelbusApp, key: str) -> str:
    """Press ``key`` and wait for the confirmation it brings up; its question."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
    assert isinstance(app.screen, ConfirmScreen)
    return app.screen.question


async def test_switch_by_keys_shows_plan_progress_and_bars(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        assert app.link.state is LinkState.CONNECTED

        # A switch to a model that fits: the plan says nothing is stopped; confirm.
        await select(pilot, app, "wan2.1-14b")
        assert "nothing is stopped" in await question_after(pilot, app, "s")
        await pilot.press("y")

        # The job shows up running, with a progress bar, while the model loads.
        jobs = app.query_one(JobsTable)
        await until(
            pilot, lambda: any("▶" in str(jobs.get_row_at(i)) for i in range(jobs.row_count))
        )
        await until(pilot, lambda: model_state(app, "wan2.1-14b") == "ready")
        await until(pilot, lambda: "wan2.1-14b 28.0G" in gpu_text(app))
        await until(pilot, lambda: "ready" in row_text(app, "wan2.1-14b"))
        assert any("switch accepted as job" in n for n in notes(app))

        # Now qwen3 needs wan2.1 gone: the plan names it and the memory it frees.
        await select(pilot, app, "qwen3-vl-30b")
        question = await question_after(pilot, app, "s")
        assert "stops wan2.1-14b" in question and "freeing 28.0G" in question, question
        await pilot.press("y")
        await until(pilot, lambda: model_state(app, "qwen3-vl-30b") == "ready")
        await until(pilot, lambda: "qwen3-vl-30b 17.0G" in gpu_text(app))
        assert "wan2.1-14b" not in gpu_text(app)
        assert model_state(app, "wan2.1-14b") == "stopped"
        # The finished job stays on screen, marked succeeded, until it fades.
        await until(
            pilot,
            lambda: any("succeeded" in str(jobs.get_row_at(i)) for i in range(jobs.row_count)),
        )


async def test_declining_the_plan_sends_nothing(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await select(pilot, app, "whisperx")
        await question_after(pilot, app, "s")
        await pilot.press("n")
        await until(pilot, lambda: any("Switch not sent" in n for n in notes(app)))
        assert not app.store.host(HOST).jobs  # type: ignore[union-attr]
        assert model_state(app, "whisperx") == "stopped"


async def test_error_reply_is_shown_and_says_what_was_wrong(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, AskScreen))
        await pilot.press(*"bad--repo", "enter")
        await until(
            pilot, lambda: any("install refused (invalid_payload)" in n for n in notes(app))
        )
        error = next(n for n in notes(app) if "install refused" in n)
        assert error.startswith("error:") and "--" in error


async def test_every_command_has_a_key_and_status_and_uninstall_are_sent(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    bound = {binding.id: binding.action for binding in ModelbusApp.BINDINGS}  # type: ignore[union-attr]
    assert set(COMMAND_BINDINGS) == set(CommandName)
    for command, binding_id in COMMAND_BINDINGS.items():
        action = bound[binding_id].split("(")[0]
        assert callable(getattr(ModelbusApp, f"action_{action}", None)), command
    app = tui(broker, prefix)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await pilot.press("r")
        await until(pilot, lambda: any("answers: 1 GPU(s)" in n for n in notes(app)))
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, AskScreen))
        await pilot.press(*"nope", "enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "'nope'" in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("y")
        await until(pilot, lambda: any("uninstall refused (not_found)" in n for n in notes(app)))


async def test_processes_a_job_in_full_and_the_events_in_full(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    """g lists each GPU's processes and what they belong to; Enter on a job and e show what
    the table and the panel cut."""
    app = tui(broker, prefix)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await load_by_key(pilot, app, "whisperx")
        assert "belongs to" not in gpu_text(app)
        await pilot.press("g")
        await until(pilot, lambda: re.search(r"\d+ +6\.0G +\S.* whisperx", gpu_text(app)))
        await pilot.press("g")
        await until(pilot, lambda: "belongs to" not in gpu_text(app))
        jobs = app.query_one(JobsTable)
        await until(pilot, lambda: jobs.row_count == 1 and "succeeded" in str(jobs.get_row_at(0)))
        jobs.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen))
        shown = app.screen.body.plain  # type: ignore[attr-defined]
        assert shown.startswith("load whisperx  job ") and "succeeded" in shown
        assert "took" in shown and "evicted  none" in shown and "timings  " in shown, shown
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, DetailScreen))
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen))
        events = app.screen.body.plain  # type: ignore[attr-defined]
        assert "model_loaded" in events and "whisperx" in events
        await pilot.press("escape")
        app.query_one(ModelsTable).focus()
        await select(pilot, app, "whisperx")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen))
        model = app.screen.body.plain  # type: ignore[attr-defined]
        assert model.startswith("whisperx  ● ready") and "last load" in model


async def test_pinned_model_unload_asks_before_forcing(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await load_by_key(pilot, app, "infinitetalk")

        assert "infinitetalk is pinned" in await question_after(pilot, app, "u")
        await pilot.press("n")
        await until(pilot, lambda: any("left running" in n for n in notes(app)))
        assert model_state(app, "infinitetalk") == "ready"

        await question_after(pilot, app, "u")
        await pilot.press("y")
        await until(pilot, lambda: model_state(app, "infinitetalk") == "stopped")


async def test_cancel_key_cancels_the_running_job(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await ready_dashboard(pilot, app)
        await select(pilot, app, "ovi-11b")
        await pilot.press("l")
        jobs = app.query_one(JobsTable)
        await until(pilot, lambda: jobs.row_count == 1 and "▶" in str(jobs.get_row_at(0)))
        # The models table has focus: c means the host's running job, named before it goes.
        assert not jobs.has_focus
        question = await question_after(pilot, app, "c")
        assert "Cancel load ovi-11b (job " in question and "running" in question
        await pilot.press("y")
        await until(
            pilot,
            lambda: any(j.state.value == "cancelled" for j in app.store.host(HOST).jobs.values()),
        )  # type: ignore[union-attr]
        await until(pilot, lambda: "cancelled" in str(jobs.get_row_at(0)))
        assert model_state(app, "ovi-11b") == "stopped"


async def test_offline_host_is_greyed_when_its_agent_dies(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    """A killed agent cannot say goodbye: the broker publishes its will."""
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id=HOST,
        prefix=prefix,
        interval_s=0.2,
        # The shortest keepalive the agent accepts, so the will comes within 7.5 s.
        extra={"broker": {"url": broker.url, "keepalive_s": 5}},
    )
    process = AgentProcess(config)
    try:
        app = tui(broker, prefix)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: "GPU0 [" in gpu_text(app))
            assert not app.query_one("#main").has_class("-offline")
            process.kill()
            # The will comes after 1.5 x keepalive; the TUI shows it at its next redraw.
            await until(pilot, lambda: app.query_one("#main").has_class("-offline"), timeout=15)
            banner = str(app.query_one("#banner").render())
            assert "OFFLINE" in banner
            hosts = app.query_one(HostList)
            assert "offline" in str(hosts.get_option_at_index(0).prompt)
            assert "1 offline" in str(app.query_one("#link").render())
    finally:
        process.close()


async def test_reconnects_by_itself_and_shows_the_link(
    own_broker: MosquittoBroker, prefix: str
) -> None:
    app = tui(own_broker, prefix, reconnect_min_s=0.05, reconnect_max_s=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state is LinkState.CONNECTED)
        own_broker.stop()
        await until(pilot, lambda: app.link.state is LinkState.RECONNECTING)
        await until(pilot, lambda: "reconnecting" in str(app.query_one("#link").render()))
        own_broker.start()
        await until(pilot, lambda: app.link.state is LinkState.CONNECTED)


async def test_no_broker_says_why_when_it_retries_and_how_to_get_one(prefix: str) -> None:
    app = build_app(client_settings(free_port()), prefix)  # nothing listens there
    async with app.run_test(size=(120, 24)) as pilot:
        await until(pilot, lambda: "next try in" in str(app.query_one("#link").render()))
        header = str(app.query_one("#link").render())
        assert header.startswith("◌ connecting") and "refused" in header.lower()
        assert "No broker answers at" in gpu_text(app) and "modelbus demo" in gpu_text(app)


async def test_refused_credentials_give_one_clear_message(
    broker: MosquittoBroker, prefix: str
) -> None:
    assert broker.auth_port is not None
    app = build_app(
        client_settings(broker.auth_port, username="operator", password="wrong"), prefix
    )
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await until(pilot, lambda: app.link.state is LinkState.REFUSED)
        await until(pilot, lambda: any("refused the credentials" in n for n in notes(app)))
        assert len([n for n in notes(app) if "refused" in n]) == 1
        await until(pilot, lambda: "refused by" in str(app.query_one("#link").render()))


async def test_operator_credentials_work(broker: MosquittoBroker, prefix: str) -> None:
    assert broker.auth_port is not None
    app = build_app(
        client_settings(broker.auth_port, username="operator", password=TEST_USERS["operator"]),
        "modelbus",
    )
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state is LinkState.CONNECTED)


async def test_bad_bus_input_is_skipped_counted_and_listed(
    broker: MosquittoBroker, prefix: str
) -> None:
    app = tui(broker, prefix)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.link.state is LinkState.CONNECTED)
        async with watch(broker.port) as bus:
            for topic, payload in (
                (f"{prefix}/{HOST}/gpu/0", b"{not json"),
                (f"{prefix}/{HOST}/models/x", b'{"name": "x"}'),
                (f"{prefix}/{HOST}/info", b"\xff\xfe"),
                (f"{prefix}/{HOST}/bogus", b"1"),
                (f"{prefix}/{HOST}/gpu/zero", b"{}"),
            ):
                await bus.connection.publish(topic, payload, qos=1)
        await until(pilot, lambda: sum(app.store.skipped.values()) == 5)
        await until(pilot, lambda: "5 skipped" in str(app.query_one("#link").render()))
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, DebugScreen))
        shown = str(app.screen.query_one("#skipped").render())
        for reason in (
            "invalid_json",
            "invalid_payload:models",
            "unknown_kind",
            "invalid_topic:gpu",
        ):
            assert reason in shown
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, DebugScreen))
        assert app.is_running


def test_tui_command_refuses_a_bad_broker_url_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from modelbus.cli import EXIT_USAGE, main

    assert main(["tui", "--broker", "http://nowhere"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("modelbus tui: ") and "mqtt://" in err and err.count("\n") == 1


async def test_install_key_shows_live_download_progress(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    with FakeHub() as hub:
        hub.add_repo("acme/big", {"config.json": "{}", "big-Q4_K_M.gguf": 8 * 1024 * 1024})
        hub.throttle(3 * 1024 * 1024)  # about 3 s: progress is seen on the way
        config = write_agent_config(
            tmp_path / "agent.yaml",
            broker_url=broker.url,
            host_id=HOST,
            prefix=prefix,
            extra={"weights": {"dir": str(tmp_path / "weights"), "endpoint": hub.endpoint}},
        )
        process = AgentProcess(config)
        try:
            app = tui(broker, prefix)
            async with app.run_test(size=(120, 40), notifications=True) as pilot:
                await until(pilot, lambda: "GPU0 [" in gpu_text(app))
                await pilot.press("i")
                await until(pilot, lambda: isinstance(app.screen, AskScreen))
                await pilot.press(*"acme/big", "enter")
                jobs = app.query_one(JobsTable)

                def row() -> str:
                    cells = jobs.get_row_at(0) if jobs.row_count else []
                    return " | ".join(str(cell) for cell in cells)

                # A row like "install big  ▶ downloading  ━━━━╌╌╌╌ 40%  1s  3M/8M downloading ..."
                partly = re.compile(r"▶ downloading \| .* \| [1-7]M/8M downloading")
                await until(pilot, lambda: "install big" in row() and partly.search(row()))
                await until(pilot, lambda: "succeeded" in row(), timeout=30)
                assert any("install accepted as job" in n for n in notes(app))

                # w: the weights panel lists them; x there uninstalls the selected row,
                # asking only to confirm.
                await pilot.press("w")
                panel = app.query_one(WeightsPanel)
                await until(pilot, lambda: panel.table.row_count == 1)
                assert panel.table.has_focus
                cells = [str(cell) for cell in panel.table.get_row_at(0)]
                assert cells[:3] == ["big", "8M", "unused"] and cells[4] == "acme/big", cells
                assert "free of" in str(panel.summary.render())
                # a: into the catalog as the install suggests (llama.cpp for a GGUF file).
                await pilot.press("a")
                await until(pilot, lambda: any("catalog: added big" in n for n in notes(app)))
                await until(pilot, lambda: "big" in model_names(app))
                panel.table.focus()
                question = await question_after(pilot, app, "x")
                assert "'big'" in question
                await pilot.press("y")
                await until(pilot, lambda: panel.table.row_count == 0)
                assert any("uninstall" in n and "error" not in n for n in notes(app))
        finally:
            process.close()


async def test_logs_key_follows_a_models_output_and_history_and_enter_show_its_loads(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    """L opens the selected model's log and new lines appear as its server writes them;
    h lists its last loads; Enter on it adds those and its last log lines to the rest."""
    chatty = sim_model(2048, load_s=0.3, extra=["--say-every", "0.3"])
    process = pilot_agent(broker, prefix, tmp_path, {"chatty": chatty})
    try:
        app = tui(broker, prefix)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.query_one(ModelsTable).row_count == 1)
            app.query_one(ModelsTable).move_cursor(row=0)
            await pilot.press("l")
            await until(pilot, lambda: model_state(app, "chatty") == "ready")

            await pilot.press("L")
            await until(pilot, lambda: isinstance(app.screen, LogScreen))
            screen = app.screen
            assert isinstance(screen, LogScreen)
            log = screen.query_one(Log)

            def numbered() -> list[int]:
                return [int(n) for n in re.findall(r"chatty: line (\d+)", "\n".join(log.lines))]

            await until(pilot, lambda: len(numbered()) >= 2)
            first = numbered()
            # Following: lines the server writes after the view opened come in, each once.
            await until(pilot, lambda: len(numbered()) >= len(first) + 3)
            seen = numbered()
            assert seen == list(range(seen[0], seen[0] + len(seen))), seen
            assert screen.following and "following" in str(screen.query_one("#log-title").render())
            await pilot.press("f")
            assert "paused" in str(screen.query_one("#log-title").render())
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, LogScreen))

            await pilot.press("h")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen))
            loads = app.screen.body.plain  # type: ignore[attr-defined]
            assert "Last loads" in loads and "1 load, " in loads, loads
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DetailScreen))

            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen))
            detail = app.screen
            await until(pilot, lambda: "Last log lines" in detail.body.plain)  # type: ignore[attr-defined]
            shown = detail.body.plain  # type: ignore[attr-defined]
            assert shown.startswith("chatty  ● ready") and "Last loads" in shown
            assert "chatty: line" in shown.split("Last log lines")[1], shown
    finally:
        process.close()

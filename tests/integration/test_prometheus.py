"""/metrics as Prometheus sees it: a real Prometheus (Debian's package) scrapes a real
agent every second while a request switches a model in and another one's load fails;
its query API shows the counters rise. promtool lints the exposition."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.brokers import free_port
from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.gateway import CHAT, Gateway, client, start_gateway
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

# .ci/run sets this: there a missing Prometheus fails these tests instead of skipping them.
REQUIRED_VARIABLE = "MODELBUS_REQUIRE_PROMETHEUS"


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    message = "Debian's prometheus package is not installed (apt-get install prometheus)"
    if os.environ.get(REQUIRED_VARIABLE):
        pytest.fail(message)
    pytest.skip(message)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    async def until(self, promql: str, check: Callable[[float | None], bool]) -> float | None:
        """The value once ``check`` holds: scrapes come every second."""
        deadline = time.monotonic() + 30
        while True:
            value = await asyncio.to_thread(self.value, promql)
            if check(value):
                return value
            assert time.monotonic() < deadline, f"{promql} is still {value}"
            await asyncio.sleep(0.25)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(agent_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: modelbus\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        prometheus.wait_ready()
        return prometheus

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


async def test_prometheus_sees_a_switch_and_a_failed_load(
    start_host: Callable[..., AgentProcess],
    host: Host,
    prometheus_for: Callable[[int], Prometheus],
) -> None:
    models = {
        "alpha": sim_model(4096, load_s=0.1),
        "broken": sim_model(4096, extra=["--exit-at-once"]),
    }
    gateway = await start_gateway(start_host, host, models)
    prometheus = await asyncio.to_thread(prometheus_for, gateway.port)
    # Scraped, and nothing swapped yet.
    await prometheus.until('up{job="modelbus"}', lambda v: v == 1)
    await prometheus.until('modelbus_model_state{model="alpha",state="stopped"}', lambda v: v == 1)
    assert await asyncio.to_thread(prometheus.value, "sum(modelbus_swaps_total)") is None

    answer = await asyncio.to_thread(
        client(gateway).chat.completions.create, model="alpha", messages=CHAT
    )
    assert answer.choices[0].message.content == "Simulated answer from alpha."
    with pytest.raises(openai.APIStatusError) as refused:
        await asyncio.to_thread(
            client(gateway).chat.completions.create, model="broken", messages=CHAT
        )
    assert refused.value.status_code == 503

    def rose(v: float | None) -> bool:
        return v is not None and v >= 1

    await prometheus.until('modelbus_swaps_total{result="succeeded"}', rose)
    await prometheus.until('modelbus_swaps_total{result="failed"}', rose)
    await prometheus.until('modelbus_load_failures_total{model="broken"}', rose)
    await prometheus.until('modelbus_model_loaded{model="alpha",gpu="0"}', lambda v: v == 1)
    await prometheus.until('modelbus_requests_total{model="alpha",code="200"}', rose)
    await prometheus.until('modelbus_requests_total{model="broken",code="503"}', rose)
    await prometheus.until("modelbus_swap_duration_seconds_count", rose)
    # dcgm-exporter's labels, so its series and ours join on them.
    (gpu,) = await asyncio.to_thread(prometheus.query, "modelbus_gpu_memory_total_bytes")
    assert gpu["metric"]["gpu"] == "0" and gpu["metric"]["UUID"].startswith("GPU-")
    assert float(gpu["value"][1]) == 32768 * 1024 * 1024
    # Every query of the dashboard is one Prometheus runs, and the VRAM panel's join
    # finds alpha on its GPU.
    for expr in _dashboard_queries():
        await asyncio.to_thread(prometheus.query, _as_grafana_sends(expr))
    (vram_panel, *_) = _dashboard_queries()
    (alpha,) = await asyncio.to_thread(prometheus.query, _as_grafana_sends(vram_panel))
    assert alpha["metric"]["model"] == "alpha" and alpha["metric"]["gpu"] == "0"
    assert float(alpha["value"][1]) > 0


async def test_promtool_finds_nothing_to_fix_in_the_exposition(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(4096, load_s=0.1)})
    # Every family with samples in it: after a request, a job and a scrape's read of state.
    await asyncio.to_thread(client(gateway).chat.completions.create, model="alpha", messages=CHAT)
    exposition = await asyncio.to_thread(_scrape, gateway)
    assert b"modelbus_swaps_total" in exposition
    checked = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b""


async def test_every_metric_the_dashboard_names_is_exposed(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(4096, load_s=0.1)})
    exposed = _exposed_names((await asyncio.to_thread(_scrape, gateway)).decode())
    named = {name for expr in _dashboard_queries() for name in METRIC_NAME.findall(expr)}
    assert len(named) >= 15
    assert named <= exposed, named - exposed


async def test_the_alert_rules_load_and_fire_on_recorded_series() -> None:
    """promtool's own checks: the rules and the scrape config load, and the unit tests
    of tests/prometheus/alerts_test.yml fire the alerts they expect, and only those."""
    for command in (
        ["check", "rules", DEPLOY / "alerts.yml"],
        ["check", "config", "--syntax-only", DEPLOY / "prometheus.yml"],
        ["test", "rules", REPO_ROOT / "tests" / "prometheus" / "alerts_test.yml"],
    ):
        done = await asyncio.to_thread(
            subprocess.run, ["promtool", *map(str, command)], capture_output=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert b"SUCCESS" in done.stdout + done.stderr


METRIC_NAME = re.compile(r"\b(modelbus_[a-z_]+)")
DEPLOY = REPO_ROOT / "deploy" / "prometheus"


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "modelbus.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _as_grafana_sends(expr: str) -> str:
    return expr.replace("$instance", ".*").replace("$__rate_interval", "1m")


def _exposed_names(exposition: str) -> set[str]:
    """Every series name a scrape may hold, the families with no samples yet included
    (a labelled counter shows only its HELP and TYPE until its first count)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def _scrape(gateway: Gateway) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=5) as answer:
        body: bytes = answer.read()
        return body

"""Install benchmark: weights download throughput from a local fake hub, and the peak
memory of the download while the file grows from 256 MiB to 1 GiB.

Not a test: it prints figures beside the weights issue's targets (at least 90 % of a
plain HTTP download's throughput; memory flat, not growing with the file's size) and
beside a baseline measured in the same run, from the same server, on the same disk.

Throughput is judged while bytes flow: bytes over the time from the first to the last
byte written (for modelbus, its first and last progress reports). The call-to-return
figure and the fixed start cost (call to return, less the bytes at the flowing rate:
the child's start, huggingface_hub's import, a HEAD per file) are latency, not
throughput, and are printed apart, without a verdict.

- The server is ``tests.support.fake_hub.FakeHub`` in this process, serving repos of one
  lazily generated file (a ``model.safetensors`` of 1 GiB of BF16 data, and one of 256 MiB)
  and a small ``config.json``. Both sides pay the same cost of generating the bytes, so the ratio is
  what counts, not the absolute MiB/s.
- modelbus: ``agent.hub.download``, as the installer calls it (its child process asks
  huggingface_hub for each file's location, a HEAD, then streams the GET with urllib's
  ``readinto`` into a 1 MiB buffer), timed from the call until it returns and by its
  progress reports, in a separate process (``--child download``) so its
  ``RUSAGE_CHILDREN`` peak RSS is exactly the download child's. The repo is resolved once
  beforehand, as the installer does before it checks the disk.
- Baseline: a plain GET of the same file's resolve URL with urllib, streamed to a file in
  the same directory through a 1 MiB buffer (``--child baseline``), timed from the request
  to the file being closed; its peak RSS is its own ``RUSAGE_SELF``.
- The two alternate, fastest-first order swapped each round, and the medians are shown.
  Downloaded files are deleted after every round.
- Then a real agent (``python -m modelbus agent``) over a private Mosquitto installs the
  256 MiB repo and then the 1 GiB one with ``install ... wait: true``; its own peak RSS
  (VmHWM) is read after each, and must not grow: the download happens in its child.
- RSS is "flat" when the peak with the large file is at most the peak with the small one
  plus the larger of 10 % and 16 MiB.

    .venv/bin/python bench/install.py            # 1 GiB vs 256 MiB, 3 rounds each
    .venv/bin/python bench/install.py --quick    # 256 MiB vs 64 MiB, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent import hub
from bus.mqtt import Connection, ConnectionSettings, Subscription, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker
from shared.topics import HostTopics
from tests.support.fake_hub import FakeHub, fake_safetensors

MIB = 1024 * 1024
TARGET_RATIO = 0.90
RSS_SLACK = 0.10  # the large file's peak may exceed the small one's by this fraction
RSS_SLACK_MIB = 16.0  # or by this much, whichever is larger
BASELINE_BUFFER = 1 * MIB
FILE = "model.safetensors"
BIG_REPO, SMALL_REPO = "bench/big", "bench/small"
_ids = itertools.count()


@dataclass
class Round:
    seconds: float  # call to return (modelbus) or request to close (baseline)
    steady_mib_s: float  # while bytes flow: first to last progress, or first byte to close
    peak_rss_mib: float
    nbytes: int

    @property
    def mib_s(self) -> float:
        return self.nbytes / MIB / self.seconds

    @property
    def fixed_s(self) -> float:
        """Call to return, less the bytes at the flowing rate: latency, not throughput."""
        return self.seconds - self.nbytes / MIB / self.steady_mib_s


def rss_limit(small_mib: float) -> float:
    return small_mib + max(RSS_SLACK * small_mib, RSS_SLACK_MIB)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the measured processes (bench/install.py --child download|baseline, JSON on stdin)


async def child_download(args: dict[str, Any]) -> dict[str, Any]:
    resolved = hub.ResolvedRepo(
        repo=args["repo"],
        revision=args["revision"],
        files=tuple(
            hub.RepoFile(path, size, False, etag=etag) for path, size, etag in args["files"]
        ),
    )
    samples: list[tuple[float, int]] = []
    settings = hub.HubSettings(endpoint=args["endpoint"])
    started = time.monotonic()
    await hub.download(
        settings,
        resolved,
        None,
        None,
        Path(args["local_dir"]),
        lambda done: samples.append((time.monotonic(), done)),
    )
    seconds = time.monotonic() - started
    flowing = [s for s in samples if s[1] > 0]
    (t0, b0), (t1, b1) = flowing[0], flowing[-1]
    # Between the first and the last report: reports come every PROGRESS_INTERVAL_S.
    steady = (b1 - b0) / MIB / (t1 - t0) if t1 > t0 else float("nan")
    # Linux reports ru_maxrss in KiB; the only child this process ever had is the download.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "steady": steady, "peak_rss_mib": peak, "bytes": b1}


def child_baseline(args: dict[str, Any]) -> dict[str, Any]:
    buffer = bytearray(BASELINE_BUFFER)
    view = memoryview(buffer)
    total = 0
    started = time.monotonic()
    first_byte = None
    with (
        urllib.request.urlopen(args["url"]) as response,
        open(args["dest"], "wb", buffering=0) as out,
    ):
        while n := response.readinto(buffer):
            if first_byte is None:
                first_byte = time.monotonic()
            out.write(view[:n])
            total += n
    ended = time.monotonic()
    assert first_byte is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steady = total / MIB / (ended - first_byte)
    return {"seconds": ended - started, "steady": steady, "peak_rss_mib": peak, "bytes": total}


def run_child(kind: str, args: dict[str, Any]) -> Round:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} child failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    return Round(result["seconds"], result["steady"], result["peak_rss_mib"], result["bytes"])


# --- the bench


def measure_downloads(
    fake: FakeHub, workdir: Path, resolved: hub.ResolvedRepo, rounds: int
) -> tuple[list[Round], list[Round]]:
    size = next(f.size for f in resolved.files if f.path == FILE)
    url = f"{fake.endpoint}/{resolved.repo}/resolve/{resolved.revision}/{FILE}"
    local_dir = workdir / "weights" / resolved.repo.replace("/", "--")
    ours: list[Round] = []
    base: list[Round] = []

    def modelbus() -> None:
        args = {
            "repo": resolved.repo,
            "revision": resolved.revision,
            "files": [[f.path, f.size, f.etag] for f in resolved.files],
            "endpoint": fake.endpoint,
            "local_dir": str(local_dir),
        }
        try:
            ours.append(run_child("download", args))
            assert (local_dir / FILE).stat().st_size == size
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    def baseline() -> None:
        local_dir.mkdir(parents=True, exist_ok=True)
        dest = local_dir / FILE
        try:
            base.append(run_child("baseline", {"url": url, "dest": str(dest)}))
            assert dest.stat().st_size == size
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    for number in range(rounds):
        order = (baseline, modelbus) if number % 2 == 0 else (modelbus, baseline)
        for step in order:
            step()
    return ours, base


async def request(
    connection: Connection, messages: Any, topics: HostTopics, command: str, body: dict[str, Any]
) -> dict[str, Any]:
    reply_topic = topics.reply(f"b{next(_ids)}")
    await connection.publish(
        topics.command(command), json.dumps(body), qos=1, response_topic=reply_topic
    )
    async for message in messages:
        if message.topic == reply_topic:
            reply: dict[str, Any] = json.loads(message.payload)
            return reply
    raise RuntimeError("the connection closed")


async def measure_agent(
    fake: FakeHub, workdir: Path, sizes: dict[str, int]
) -> tuple[float, dict[str, tuple[float, float]]]:
    """The agent's peak RSS once online, and after installing each repo of ``sizes`` in
    turn: (its peak RSS then, the install's MiB/s over MQTT)."""
    prefix = "bench-install"
    config = {
        "host_id": "bench",
        "prefix": prefix,
        "state_dir": str(workdir / "agent-state"),
        "log_level": "warning",
        "gpu": {"backend": "sim", "sim": {"gpus": [{"memory_total_mb": 32768}]}},
        "weights": {
            "dir": str(workdir / "agent-weights"),
            "endpoint": fake.endpoint,
            "disk_reserve_mb": 0,
        },
        "http": {"listen": None},
    }
    topics = HostTopics(prefix, "bench")
    figures: dict[str, tuple[float, float]] = {}
    with MosquittoBroker(DEMO_CONFIG, workdir=workdir / "broker") as broker:
        config["broker"] = {"url": broker.url}
        config_file = workdir / "agent.yaml"
        config_file.write_text(yaml.safe_dump(config))
        agent = subprocess.Popen(
            [sys.executable, "-m", "modelbus", "agent", "--config", str(config_file)], cwd=REPO
        )
        settings = ConnectionSettings(
            "127.0.0.1", broker.port, "bench-install-client", persistent_session=False
        )
        try:
            async with connect(settings) as connection:
                await connection.subscribe(
                    [Subscription(topics.status), Subscription(f"{prefix}/reply/#")]
                )
                messages = connection.messages()
                async for message in messages:
                    if message.topic == topics.status and message.payload == b"online":
                        break
                idle = peak_rss_mib(agent.pid)
                for repo, size in sizes.items():
                    name = repo.split("/")[1]
                    started = time.monotonic()
                    reply = await request(
                        connection, messages, topics, "install", {"repo": repo, "wait": True}
                    )
                    seconds = time.monotonic() - started
                    assert reply["status"] == "ok", reply
                    figures[repo] = (peak_rss_mib(agent.pid), size / MIB / seconds)
                    reply = await request(
                        connection, messages, topics, "uninstall", {"name": name, "wait": True}
                    )
                    assert reply["status"] == "ok", reply
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    return idle, figures


def resolve(fake: FakeHub, workdir: Path, repo: str) -> hub.ResolvedRepo:
    settings = hub.HubSettings(endpoint=fake.endpoint)
    local_dir = workdir / "weights" / repo.replace("/", "--")
    return asyncio.run(hub.resolve(settings, repo, None, None, None, local_dir))


def row(name: str, ours: float, base: float | None, target: float | None, ok: bool | None) -> None:
    base_text = f"{base:10.1f}" if base is not None else f"{'-':>10}"
    target_text = f"{target:10.1f}" if target is not None else f"{'-':>10}"
    verdict = "" if ok is None else ("meets" if ok else "MISSES")
    print(f"{name:40} {ours:10.1f} {base_text} {target_text}  {verdict}")


def size_name(nbytes: int) -> str:
    return f"{nbytes // 1024**3} GiB" if nbytes >= 1024**3 else f"{nbytes // MIB} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="the large file, MiB")
    parser.add_argument("--small-mib", type=int, default=256, help="the small file, MiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side, large file")
    parser.add_argument("--no-agent", action="store_true", help="skip the agent over MQTT")
    parser.add_argument(
        "--link-mib-s",
        type=float,
        default=119.0,
        help="also measure behind a link this fast (the server throttled; 119 = 1 Gbit/s)",
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB vs 64 MiB, 1 round")
    parser.add_argument("--child", choices=("download", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_args = json.loads(sys.stdin.read())
        if args.child == "download":
            result = asyncio.run(child_download(child_args))
        else:
            result = child_baseline(child_args)
        print(json.dumps(result))
        return
    if args.quick:
        args.big_mib, args.small_mib, args.rounds = 256, 64, 1
    big, small = args.big_mib * MIB, args.small_mib * MIB
    began = time.monotonic()
    config = json.dumps({"architectures": ["BenchLM"]})
    with tempfile.TemporaryDirectory(prefix="modelbus-bench-") as tmp, FakeHub() as fake:
        workdir = Path(tmp)
        for repo, size in ((BIG_REPO, big), (SMALL_REPO, small)):
            # A real safetensors file (the agent reads its header after the download).
            weights = fake_safetensors({"model.weight": ("BF16", (size // 8192, 4096))})
            fake.add_repo(repo, {"config.json": config, FILE: weights})
        for repo in (BIG_REPO, SMALL_REPO):
            fake.file_sha256(repo, FILE)  # hashed once, now, rather than inside a timed HEAD
        resolved_big = resolve(fake, workdir, BIG_REPO)
        resolved_small = resolve(fake, workdir, SMALL_REPO)
        ours, base = measure_downloads(fake, workdir, resolved_big, args.rounds)
        ours_small, base_small = measure_downloads(fake, workdir, resolved_small, 1)
        # On loopback both sides are CPU-bound; behind a real link the link is the limit.
        fake.throttle(args.link_mib_s * MIB)
        ours_link, base_link = measure_downloads(fake, workdir, resolved_big, 1)
        fake.throttle(None)
        agent = None
        if not args.no_agent:
            agent = asyncio.run(measure_agent(fake, workdir, {SMALL_REPO: small, BIG_REPO: big}))
    elapsed = time.monotonic() - began

    def median(rounds: list[Round], field: str) -> float:
        return statistics.median(getattr(r, field) for r in rounds)

    big_name, small_name = size_name(big), size_name(small)
    print(
        f"install bench: {big_name} and {small_name} lazily generated files from a local fake "
        f"hub, {args.rounds} round(s) each side alternating, {os.cpu_count()} cores, "
        f"huggingface_hub for metadata and urllib for the bytes in the download child; "
        f"{elapsed:.0f} s in all"
    )
    print(f"{'figure':40} {'modelbus':>10} {'baseline':>10} {'target':>10}  verdict")
    flow, flow_base = median(ours, "steady_mib_s"), median(base, "steady_mib_s")
    row(
        f"download {big_name}, MiB/s while flowing",
        flow,
        flow_base,
        TARGET_RATIO * flow_base,
        flow >= TARGET_RATIO * flow_base,
    )
    link_flow, link_flow_base = median(ours_link, "steady_mib_s"), median(base_link, "steady_mib_s")
    row(
        f"{big_name} at {args.link_mib_s:g} MiB/s link, while flowing",
        link_flow,
        link_flow_base,
        TARGET_RATIO * link_flow_base,
        link_flow >= TARGET_RATIO * link_flow_base,
    )
    print("latency, not throughput (no verdict):")
    ours_rate, base_rate = median(ours, "mib_s"), median(base, "mib_s")
    row(f"download {big_name}, MiB/s call to return", ours_rate, base_rate, None, None)
    row(
        f"download {big_name}, s call to return",
        median(ours, "seconds"),
        median(base, "seconds"),
        None,
        None,
    )
    row(
        f"download {big_name}, fixed start cost, s",
        median(ours, "fixed_s"),
        median(base, "fixed_s"),
        None,
        None,
    )
    row(
        f"download {small_name}, MiB/s call to return",
        median(ours_small, "mib_s"),
        median(base_small, "mib_s"),
        None,
        None,
    )
    link_rate, link_base = median(ours_link, "mib_s"), median(base_link, "mib_s")
    row(
        f"{big_name} at {args.link_mib_s:g} MiB/s link, call to return",
        link_rate,
        link_base,
        None,
        None,
    )
    print("memory:")
    small_peak, big_peak = median(ours_small, "peak_rss_mib"), max(r.peak_rss_mib for r in ours)
    row(
        f"download child peak RSS, {small_name}, MiB",
        small_peak,
        median(base_small, "peak_rss_mib"),
        None,
        None,
    )
    row(
        f"download child peak RSS, {big_name}, MiB",
        big_peak,
        max(r.peak_rss_mib for r in base),
        rss_limit(small_peak),
        big_peak <= rss_limit(small_peak),
    )
    if agent is not None:
        idle, figures = agent
        print("the agent over MQTT:")
        (small_rss, _), (big_rss, big_rate) = figures[SMALL_REPO], figures[BIG_REPO]
        row("agent peak RSS, online and idle, MiB", idle, None, None, None)
        row(f"agent peak RSS, after {small_name} install", small_rss, None, None, None)
        row(
            f"agent peak RSS, after {big_name} install",
            big_rss,
            None,
            rss_limit(small_rss),
            big_rss <= rss_limit(small_rss),
        )
        row(f"install {big_name} over MQTT, MiB/s", big_rate, base_rate, None, None)
    ratios = ", ".join(
        f"{o.steady_mib_s / b.steady_mib_s:.0%}" for o, b in zip(ours, base, strict=True)
    )
    print(
        f"throughput while flowing, modelbus/baseline: {flow / flow_base:.0%} of the plain "
        f"download (target >= {TARGET_RATIO:.0%}; per round {ratios}); behind a "
        f"{args.link_mib_s:g} MiB/s link: {link_flow / link_flow_base:.0%}"
    )
    print(
        f"call to return: {ours_rate / base_rate:.0%} of the plain download; the fixed start "
        f"cost ({median(ours, 'fixed_s'):.2f} s: child start, huggingface_hub import, a HEAD "
        "per file) is latency, paid once per install, not throughput"
    )
    print(
        f"RSS flat: peak with {big_name} <= peak with {small_name} + max({RSS_SLACK:.0%}, "
        f"{RSS_SLACK_MIB:g} MiB)"
    )
    print(
        "baseline: urllib GET of the same resolve URL from the same server, 1 MiB buffer "
        "to a file on the same disk, in its own process"
    )


if __name__ == "__main__":
    main()

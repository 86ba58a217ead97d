"""What the install queue's jobs do: download weights from the Hugging Face Hub with
byte progress, check the disk first, and record what was installed.

The hub itself is behind ``agent.hub`` (a child process per download, so a cancel
is immediate); the weights directory behind ``agent.weights``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from agent import hub
from agent.config import WeightsConfig
from agent.job_worker import JobPublisher, JobUpdate
from agent.jobs import InstallRequest, Job, JobFailure
from agent.presets import gguf_file
from agent.weights import MIB, WeightsDir, manifest_for
from agent.weights_estimate import estimate_directory, suggest_catalog_entry
from shared.commands import CommandError
from shared.messages import ErrorCode, Event, EventType, Installed, JobPhase, Severity, VramEstimate

# Progress is measured over this window for the ETA: long enough to smooth bursts,
# short enough to follow a link that slows down.
RATE_WINDOW_S = 5.0


class Rate:
    """Bytes per second over the last RATE_WINDOW_S, for the ETA."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> None:
        now = self._clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()

    def eta_s(self, left: int) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or b1 <= b0:
            return None
        return left / ((b1 - b0) / (t1 - t0))


@contextlib.asynccontextmanager
async def reporting(report: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Runs ``report`` beside the body, and ends it with the body."""
    task = asyncio.create_task(report)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Installing:
    cancelled_message = "cancelled while downloading; finished files are kept for a retry"

    def __init__(
        self,
        config: WeightsConfig,
        weights: WeightsDir,
        publisher: JobPublisher,
        update_job: JobUpdate,
        published_state: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.config = config
        self.weights = weights
        self.publisher = publisher
        self.update_job = update_job
        self.published_state = published_state
        self.hub = hub.HubSettings(
            endpoint=config.endpoint, token=config.token, timeout_s=config.resolve_timeout_s
        )

    async def run(self, job: Job[InstallRequest]) -> None:
        try:
            await self._install(job)
        except (hub.HubError, CommandError) as exc:
            raise JobFailure(exc.code, exc.message) from None
        except OSError as exc:
            raise JobFailure(ErrorCode.INTERNAL, f"the weights directory failed: {exc}") from None

    async def recover(self, job: Job[InstallRequest], failure: BaseException) -> None:
        """Nothing to undo: finished files are kept for a retry, which resumes them."""

    async def settled(self, job: Job[InstallRequest]) -> None:
        # The weights topic first: whoever the final job update wakes sees the
        # install (or its partial files) listed already.
        await self.published_state()

    def describe(self, job: Job[InstallRequest]) -> str:
        return f"install {job.request.repo}"

    async def _install(self, job: Job[InstallRequest]) -> None:
        request = job.request
        name, repo = request.name, request.repo
        include = list(request.include) if request.include is not None else None
        exclude = list(request.exclude) if request.exclude is not None else None
        path = self.weights.path_for(name)
        job.advance(JobPhase.DOWNLOADING, 0.0, f"looking up {repo} on the hub")
        await self.update_job(job)
        resolved = await hub.resolve(self.hub, repo, request.revision, include, exclude, path)
        if not resolved.files:
            raise JobFailure(
                ErrorCode.NOT_FOUND, f"{repo} has no files matching the include/exclude patterns"
            )
        free = await asyncio.to_thread(self.weights.free_bytes)
        reserve = self.config.disk_reserve_mb * MIB
        if resolved.missing_bytes + reserve > free:
            raise JobFailure(
                ErrorCode.INSUFFICIENT_DISK,
                f"{repo} needs {resolved.missing_bytes / 2**30:.1f} GiB more; the weights disk "
                f"has {free / 2**30:.1f} GiB free and keeps {reserve / 2**30:.1f} GiB in reserve",
            )
        await asyncio.to_thread(self.weights.begin, name, repo)
        present = resolved.total_bytes - resolved.missing_bytes
        job.bytes_total, job.bytes_done = resolved.total_bytes, present
        job.advance(
            JobPhase.DOWNLOADING,
            present / resolved.total_bytes if resolved.total_bytes else 0.0,
            f"downloading {repo}@{resolved.revision[:12]}"
            + (f" ({present / MIB:.0f} MiB already here)" if present else ""),
        )
        await self.update_job(job)
        rate = Rate()
        rate.add(present)

        def on_progress(downloaded: int) -> None:
            done = min(present + downloaded, resolved.total_bytes)
            job.bytes_done = done
            rate.add(done)
            job.eta_s = rate.eta_s(resolved.total_bytes - done)
            if resolved.total_bytes:
                # The last percent is the estimate and the manifest.
                job.advance(JobPhase.DOWNLOADING, 0.99 * done / resolved.total_bytes)

        async with reporting(self._report(job)):
            await hub.download(self.hub, resolved, include, exclude, path, on_progress)
        job.bytes_done, job.eta_s = resolved.total_bytes, 0.0
        job.advance(JobPhase.VERIFYING, 0.99, "reading the safetensors metadata")
        await self.update_job(job)
        estimate = await asyncio.to_thread(estimate_directory, path)
        gguf = await asyncio.to_thread(gguf_file, path)
        manifest = await asyncio.to_thread(
            manifest_for,
            name,
            repo,
            resolved.revision,
            requested_revision=request.revision,
            include=include,
            exclude=exclude,
            path=path,
            files=len(resolved.files),
            vram_estimate_mb=estimate.vram_estimate_mb if estimate else None,
        )
        await asyncio.to_thread(self.weights.commit, manifest)
        result = Installed(
            name=name,
            repo=repo,
            revision=resolved.revision,
            path=str(path),
            size_mb=round(manifest.size_bytes / MIB),
            files=manifest.files,
            downloaded_mb=round(resolved.missing_bytes / MIB),
            vram_estimate=None
            if estimate is None
            else VramEstimate(
                vram_mb=estimate.vram_estimate_mb,
                parameters=estimate.parameters,
                dtype=estimate.dtype,
                weights_mb=round(estimate.weights_bytes / MIB),
                overhead_mb=estimate.overhead_mb,
                missing_shards=list(estimate.missing_shards),
                note=estimate.note,
            ),
            suggested_catalog_entry=suggest_catalog_entry(
                name, repo, resolved.revision, estimate, gguf=gguf is not None
            ),
        )
        job.succeed(result, f"installed {repo} as {name}")
        await self.publisher.event(
            Event(
                event_type=EventType.WEIGHTS_INSTALLED,
                severity=Severity.INFO,
                message=f"installed {repo} as {name} ({manifest.size_bytes / MIB:.0f} MiB)",
                model=name,
                job_id=job.job_id,
            )
        )

    async def _report(self, job: Job[InstallRequest]) -> None:
        """Progress goes out on a clock, not per chunk: at least once a second even
        when the link stalls (the ETA then grows), and never more than needed."""
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            await self.update_job(job)

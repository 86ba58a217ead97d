"""Installs: weights downloaded from the Hugging Face Hub as jobs with byte progress.

Installs have their own bounded queue and worker, apart from the swap queue: a swap
is never stuck behind a 40 GB download, and a download never holds the swap lock.
The hub itself is behind ``agent.hub`` (a child process per download, so a cancel
is immediate); the weights directory behind ``agent.weights``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent import hub
from agent.catalog import Catalog
from agent.config import WeightsConfig
from agent.database import Database
from agent.job_publishing import JobPublisher, QueuePositions, publish_job, wait_for_job
from agent.jobs import Job, JobRequest, QueueFullError, SwapQueue
from agent.weights import MIB, WeightsDir, default_name, manifest_for
from agent.weights_estimate import estimate_directory, suggest_catalog_entry
from shared.commands import CommandError, InstallCommand
from shared.messages import ErrorCode, Event, JobPhase, Severity, WeightsState

log = logging.getLogger("modelbus.installer")

# Progress is measured over this window for the ETA: long enough to smooth bursts,
# short enough to follow a link that slows down.
RATE_WINDOW_S = 5.0
# How often the weights topic is refreshed while idle (disk usage moves on its own).
WEIGHTS_REFRESH_S = 60.0


class InstallPublisher(JobPublisher, Protocol):
    async def weights_changed(self, state: WeightsState) -> None: ...


def allowed(repo: str, patterns: list[str]) -> bool:
    """``org/name``, ``org/*`` or a bare ``name``; an empty list allows everything."""
    return not patterns or any(fnmatch.fnmatchcase(repo, p) for p in patterns)


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


class Installer:
    def __init__(
        self,
        config: WeightsConfig,
        root: Path,
        catalog: Catalog,
        store: Database,
        publisher: InstallPublisher,
        *,
        model_loaded: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.weights = WeightsDir(root)
        self.catalog = catalog
        self.store = store
        self.publisher = publisher
        self.model_loaded = model_loaded
        self.hub = hub.HubSettings(
            endpoint=config.endpoint, token=config.token, timeout_s=config.resolve_timeout_s
        )
        self.queue = SwapQueue(limit=config.queue_limit, name="install")
        self._positions = QueuePositions(self.queue, publisher)
        self._wakeup = asyncio.Event()
        self._running: tuple[Job, asyncio.Task[None]] | None = None
        self._stopping = False
        self._announcements: set[asyncio.Task[None]] = set()

    # ---- what others ask -------------------------------------------------

    def submit(self, command: InstallCommand, *, request_id: str | None) -> tuple[Job, bool]:
        repo = command.repo
        if not allowed(repo, self.config.allow):
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"{repo} is not allowed here: weights.allow permits {', '.join(self.config.allow)}",
            )
        name = command.name or default_name(repo)
        self.weights.path_for(name)  # refuses names that could reach outside
        holder = self._holder(name)
        if holder is not None and holder != repo:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                f"weights name {name!r} already holds {holder}; choose another name "
                "or uninstall it first",
            )
        request = JobRequest(
            "install",
            name,
            repo=repo,
            revision=command.revision,
            include=tuple(command.include) if command.include is not None else None,
            exclude=tuple(command.exclude) if command.exclude is not None else None,
        )
        for active in self._active():
            if active.request.model == name and active.request != request:
                raise CommandError(
                    ErrorCode.BUSY,
                    f"job {active.job_id} is already installing {name!r} with other "
                    "options; wait for it or cancel it",
                )
        try:
            job, joined = self.queue.submit(Job(request, request_id=request_id))
        except QueueFullError as exc:
            raise CommandError(ErrorCode.QUEUE_FULL, str(exc)) from None
        if not joined:
            self._wakeup.set()
            self._positions.moved()
            announcement = asyncio.get_running_loop().create_task(self._job_update(job))
            self._announcements.add(announcement)
            announcement.add_done_callback(self._announcements.discard)
        return job, joined

    def find(self, job_id: str) -> Job | None:
        return self.queue.find(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running install; None when ``job_id`` is not an install."""
        queued = self.queue.remove(job_id)
        if queued is not None:
            queued.cancel("cancelled while queued")
            await self._job_update(queued, final=True)
            self._positions.moved()
            return queued
        if self._running is not None and self._running[0].job_id == job_id:
            job, task = self._running
            job.message = "cancelling"
            task.cancel()
            return job
        return None

    async def uninstall(self, name: str) -> dict[str, Any]:
        path = self.weights.path_for(name)
        for active in self._active():
            if active.request.model == name:
                raise CommandError(
                    ErrorCode.BUSY,
                    f"job {active.job_id} is installing {name!r}; cancel it first",
                )
        users = [m for m in self.used_by().get(name, []) if self.model_loaded(m)]
        if users:
            raise CommandError(
                ErrorCode.BUSY,
                f"{name!r} is used by loaded model(s) {', '.join(users)}; unload them first",
            )
        installed = await asyncio.to_thread(self.weights.manifest, name)
        if installed is None and not path.is_dir():
            raise CommandError(ErrorCode.NOT_FOUND, f"no weights named {name!r} are installed")
        freed = await asyncio.to_thread(self.weights.remove, name)
        await self.publish_state()
        await self.publisher.event(
            Event(
                event_type="weights_uninstalled",
                severity=Severity.INFO,
                message=f"removed weights {name} ({freed / MIB:.0f} MiB)",
                model=name,
            )
        )
        return {
            "name": name,
            "was": "installed" if installed is not None else "partial",
            "freed_mb": round(freed / MIB),
        }

    def used_by(self) -> dict[str, list[str]]:
        """Weights name -> catalog models that name them (``weights:``) or serve their
        repo (``hf_repo:``)."""
        by_repo = {m.repo: m.name for m in self.weights.installed()}
        users: dict[str, list[str]] = {}
        for spec in self.catalog.models.values():
            name = spec.weights or (by_repo.get(spec.hf_repo) if spec.hf_repo else None)
            if name is not None:
                users.setdefault(name, []).append(spec.name)
        return users

    def state(self) -> WeightsState:
        return self.weights.state(self.used_by())

    async def publish_state(self) -> None:
        await self.publisher.weights_changed(await asyncio.to_thread(self.state))

    # ---- running ---------------------------------------------------------

    async def start(self) -> None:
        """huggingface_hub's ``*.incomplete`` files (downloads before modelbus resumed files
        itself) are never resumed; they only take disk. Part files are kept for the retry."""
        await asyncio.to_thread(self.weights.ensure)
        for partial in await asyncio.to_thread(self.weights.partial):
            removed = await asyncio.to_thread(hub.remove_incomplete, partial.path)
            if removed:
                log.info("removed %d unfinished download file(s) of %s", removed, partial.name)
        await self.publish_state()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._worker(), name="install-worker")
            group.create_task(self._refresh(), name="weights-refresh")

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._positions.stop()

    async def _refresh(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WEIGHTS_REFRESH_S)
            await self.publish_state()

    async def _worker(self) -> None:
        while not self._stopping:
            job = self.queue.take()
            if job is None:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            task = asyncio.create_task(self._execute(job), name=f"install-{job.job_id}")
            self._running = (job, task)
            await self._job_update(job)
            self._positions.moved()
            try:
                # The download's child process must be gone before the worker is.
                await wait_for_job(
                    job, task, cancel_message="cancelled while downloading", settle_on_shutdown=True
                )
            finally:
                self._running = None
                self.queue.done(job)
            # The weights topic first: whoever the final job update wakes sees the
            # install (or its partial files) listed already.
            await self.publish_state()
            await self._job_update(job, final=True)

    async def _execute(self, job: Job) -> None:
        request = job.request
        try:
            await self._install(job)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            job.cancel("cancelled while downloading; finished files are kept for a retry")
        except hub.HubError as exc:
            job.fail(exc.code, exc.message)
        except CommandError as exc:
            job.fail(exc.code, exc.message)
        except OSError as exc:
            job.fail(ErrorCode.INTERNAL, f"the weights directory failed: {exc}")
        except Exception as exc:  # one broken install must not stop the worker
            log.exception("install %s failed unexpectedly", job.job_id)
            job.fail(ErrorCode.INTERNAL, f"the agent failed while installing: {exc}")
        if job.state.value == "failed" and job.error is not None:
            await self.publisher.event(
                Event(
                    event_type="job_failed",
                    severity=Severity.ERROR,
                    message=f"install {request.repo} failed: {job.error.message}",
                    model=request.model,
                    job_id=job.job_id,
                )
            )

    async def _install(self, job: Job) -> None:
        request = job.request
        assert request.repo is not None
        name, repo = request.model, request.repo
        include = list(request.include) if request.include is not None else None
        exclude = list(request.exclude) if request.exclude is not None else None
        path = self.weights.path_for(name)
        job.advance(JobPhase.DOWNLOADING, 0.0, f"looking up {repo} on the hub")
        await self._job_update(job)
        resolved = await hub.resolve(self.hub, repo, request.revision, include, exclude, path)
        if not resolved.files:
            raise CommandError(
                ErrorCode.NOT_FOUND, f"{repo} has no files matching the include/exclude patterns"
            )
        free = await asyncio.to_thread(self.weights.free_bytes)
        reserve = self.config.disk_reserve_mb * MIB
        if resolved.missing_bytes + reserve > free:
            raise CommandError(
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
        await self._job_update(job)
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

        reporter = asyncio.create_task(self._report(job))
        try:
            await hub.download(self.hub, resolved, include, exclude, path, on_progress)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        job.bytes_done, job.eta_s = resolved.total_bytes, 0.0
        job.advance(JobPhase.VERIFYING, 0.99, "reading the safetensors metadata")
        await self._job_update(job)
        estimate = await asyncio.to_thread(estimate_directory, path)
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
        result: dict[str, Any] = {
            "name": name,
            "repo": repo,
            "revision": resolved.revision,
            "path": str(path),
            "size_mb": round(manifest.size_bytes / MIB),
            "files": manifest.files,
            "downloaded_mb": round(resolved.missing_bytes / MIB),
            "vram_estimate": None,
            "suggested_catalog_entry": suggest_catalog_entry(
                name, repo, resolved.revision, path, estimate
            ),
        }
        if estimate is not None:
            result["vram_estimate"] = {
                "vram_mb": estimate.vram_estimate_mb,
                "parameters": estimate.parameters,
                "dtype": estimate.dtype,
                "weights_mb": round(estimate.weights_bytes / MIB),
                "overhead_mb": estimate.overhead_mb,
                "missing_shards": list(estimate.missing_shards),
                "note": estimate.note,
            }
        job.succeed(result, f"installed {repo} as {name}")
        await self.publisher.event(
            Event(
                event_type="weights_installed",
                severity=Severity.INFO,
                message=f"installed {repo} as {name} ({manifest.size_bytes / MIB:.0f} MiB)",
                model=name,
                job_id=job.job_id,
            )
        )

    async def _report(self, job: Job) -> None:
        """Progress goes out on a clock, not per chunk: at least once a second even
        when the link stalls (the ETA then grows), and never more than needed."""
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            await self._job_update(job)

    def _active(self) -> list[Job]:
        return ([self.queue.running] if self.queue.running else []) + self.queue.queued()

    def _holder(self, name: str) -> str | None:
        """The repo that weights ``name`` hold (installed or half-installed), if any."""
        manifest = self.weights.manifest(name)
        return manifest.repo if manifest is not None else self.weights.pending_repo(name)

    async def _job_update(self, job: Job, *, final: bool = False) -> None:
        self._positions.published(await publish_job(job, self.store, self.publisher, final=final))

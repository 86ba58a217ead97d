"""Installs: weights downloaded from the Hugging Face Hub as jobs with byte progress
(``install_job`` does the downloading), and uninstalls.

Installs have their own bounded queue and worker, apart from the swap queue: a swap
is never stuck behind a 40 GB download, and a download never holds the swap lock.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent import hub
from agent.background import Background
from agent.catalog import Catalog
from agent.config import WeightsConfig
from agent.database import Database
from agent.install_job import Installing
from agent.job_worker import JobPublisher, JobWorker
from agent.jobs import InstallRequest, Job
from agent.weights import MIB, WeightsDir, default_name
from shared.commands import CommandError, InstallCommand
from shared.messages import ErrorCode, Event, EventType, JobOrigin, Severity, WeightsState
from shared.replies import Uninstalled

log = logging.getLogger("modelbus.installer")

# How often the weights topic is refreshed while idle (disk usage moves on its own).
WEIGHTS_REFRESH_S = 60.0


class InstallPublisher(JobPublisher, Protocol):
    async def weights_changed(self, state: WeightsState) -> None: ...


def allowed(repo: str, patterns: list[str]) -> bool:
    """``org/name``, ``org/*`` or a bare ``name``; an empty list allows everything."""
    return not patterns or any(fnmatch.fnmatchcase(repo, p) for p in patterns)


class Installer:
    def __init__(
        self,
        config: WeightsConfig,
        root: Path,
        catalog: Catalog,
        store: Database,
        publisher: InstallPublisher,
        background: Background,
        *,
        model_loaded: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.weights = WeightsDir(root)
        self.catalog = catalog
        self.store = store
        self.publisher = publisher
        self.model_loaded = model_loaded
        self.installing = Installing(
            config, self.weights, publisher, self._update_job, self.publish_state
        )
        self.worker: JobWorker[InstallRequest] = JobWorker(
            self.installing,
            store,
            publisher,
            background,
            name="install",
            limit=config.queue_limit,
        )
        self._stopping = False
        # Weights whose files an uninstall is deleting now.
        self._removing: set[str] = set()

    def _refuse_while_removing(self, name: str) -> None:
        if name in self._removing:
            raise CommandError(
                ErrorCode.BUSY, f"{name!r} is being uninstalled; try again once it is gone"
            )

    # ---- what others ask -------------------------------------------------

    async def submit(
        self, command: InstallCommand, *, request_id: str | None
    ) -> tuple[Job[InstallRequest], bool]:
        repo = command.repo
        if not allowed(repo, self.config.allow):
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"{repo} is not allowed here: weights.allow permits {', '.join(self.config.allow)}",
            )
        name = command.name or default_name(repo)
        self.weights.path_for(name)  # refuses names that could reach outside
        self._refuse_while_removing(name)
        holder = await asyncio.to_thread(self._holder, name)
        if holder is not None and holder != repo:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                f"weights name {name!r} already holds {holder}; choose another name "
                "or uninstall it first",
            )
        request = InstallRequest(
            name,
            repo,
            revision=command.revision,
            include=tuple(command.include) if command.include is not None else None,
            exclude=tuple(command.exclude) if command.exclude is not None else None,
        )
        for active in self.worker.active():
            if active.request.name == name and active.request != request:
                raise CommandError(
                    ErrorCode.BUSY,
                    f"job {active.job_id} is already installing {name!r} with other "
                    "options; wait for it or cancel it",
                )
        return self.worker.submit(Job(request, request_id=request_id, origin=JobOrigin.BUS))

    async def cancel(self, job_id: str) -> Job[InstallRequest] | None:
        """Cancel a queued or running install; None when ``job_id`` is not an install."""
        return await self.worker.cancel(job_id)

    async def uninstall(self, name: str) -> Uninstalled:
        """Delete ``name``'s files, in a thread: this runs beside the command intake."""
        path = self.weights.path_for(name)
        self._refuse_while_removing(name)
        for active in self.worker.active():
            if active.request.name == name:
                raise CommandError(
                    ErrorCode.BUSY,
                    f"job {active.job_id} is installing {name!r}; cancel it first",
                )
        used_by = await asyncio.to_thread(self.used_by)
        users = [m for m in used_by.get(name, []) if self.model_loaded(m)]
        if users:
            raise CommandError(
                ErrorCode.BUSY,
                f"{name!r} is used by loaded model(s) {', '.join(users)}; unload them first",
            )
        installed = await asyncio.to_thread(self.weights.manifest, name)
        if installed is None and not await asyncio.to_thread(path.is_dir):
            raise CommandError(ErrorCode.NOT_FOUND, f"no weights named {name!r} are installed")
        self._refuse_while_removing(name)  # a second uninstall may have started meanwhile
        self._removing.add(name)
        try:
            freed = await asyncio.to_thread(self.weights.remove, name)
        finally:
            self._removing.discard(name)
        await self.publish_state()
        await self.publisher.event(
            Event(
                event_type=EventType.WEIGHTS_UNINSTALLED,
                severity=Severity.INFO,
                message=f"removed weights {name} ({freed / MIB:.0f} MiB)",
                model=name,
            )
        )
        return Uninstalled(
            name=name,
            was="installed" if installed is not None else "partial",
            freed_mb=round(freed / MIB),
        )

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
            group.create_task(self.worker.run(), name="install-worker")
            group.create_task(self._refresh(), name="weights-refresh")

    def stop(self) -> None:
        self._stopping = True
        self.worker.stop()

    async def _refresh(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WEIGHTS_REFRESH_S)
            await self.publish_state()

    async def _update_job(self, job: Job[Any]) -> None:
        await self.worker.update(job)

    def _holder(self, name: str) -> str | None:
        """The repo that weights ``name`` hold (installed or half-installed), if any."""
        manifest = self.weights.manifest(name)
        return manifest.repo if manifest is not None else self.weights.pending_repo(name)

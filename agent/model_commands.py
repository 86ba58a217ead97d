"""The job commands (load, unload, switch, install), plan, uninstall and cancel as bus handlers.

Job commands reply at once with the job id, or, with ``wait: true``, once when
the job ends; a request equal to a queued or running one joins that job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.installer import Installer
from agent.intake import Intake
from agent.jobs import Job, SwapRequest
from agent.lifecycle import Lifecycle
from agent.planner import Plan, Refusal
from agent.sleep_planner import RestPlan
from shared.commands import (
    CancelCommand,
    CommandError,
    InstallCommand,
    LoadCommand,
    PlanCommand,
    SwitchCommand,
    UninstallCommand,
    UnloadCommand,
)
from shared.messages import ErrorCode, JobCommand, JobOrigin, JobRef, JobState, JobStatus, Reply
from shared.replies import JobAccepted, JobOutcome, JobsQueued, PlanFits, PlanRefused
from shared.topics import CommandName

Handler = Callable[[Intake], Awaitable[Reply[Any] | None]]
SendReply = Callable[[Intake, Reply[Any]], None]


class ModelCommands:
    def __init__(self, lifecycle: Lifecycle, installer: Installer, send_reply: SendReply) -> None:
        self.lifecycle = lifecycle
        self.installer = installer
        self._send_reply = send_reply
        self._waiting: dict[str, list[Intake]] = {}
        # Cancels that answer once their job has ended.
        self._cancelling: dict[str, list[Intake]] = {}

    # Deleting weights can take minutes: the intake goes on meanwhile.
    slow_commands = frozenset({CommandName.UNINSTALL})

    def handlers(self) -> dict[str, Handler]:
        return {
            CommandName.LOAD: self._job_command,
            CommandName.UNLOAD: self._job_command,
            CommandName.SWITCH: self._job_command,
            CommandName.INSTALL: self._job_command,
            CommandName.UNINSTALL: self._uninstall,
            CommandName.PLAN: self._plan,
            CommandName.CANCEL: self._cancel,
        }

    async def _submit(self, intake: Intake) -> tuple[Job[Any], bool]:
        command = intake.command
        if isinstance(command, InstallCommand):
            return await self.installer.submit(command, request_id=intake.request_id)
        priority = 0
        if isinstance(command, LoadCommand):
            request = SwapRequest(JobCommand.LOAD, command.model, gpu=command.gpu)
            priority = command.priority or 0
        elif isinstance(command, SwitchCommand):
            request = SwapRequest(
                JobCommand.SWITCH,
                command.model,
                gpu=command.gpu,
                exclusive=command.exclusive,
                force=command.force,
            )
        elif isinstance(command, UnloadCommand) and command.model is not None:
            request = SwapRequest(JobCommand.UNLOAD, command.model, force=command.force)
        else:  # pragma: no cover - the handler table only routes the four job commands
            raise CommandError(ErrorCode.INTERNAL, "not a job command")
        return self.lifecycle.submit(
            request, request_id=intake.request_id, priority=priority, origin=JobOrigin.BUS
        )

    async def _job_command(self, intake: Intake) -> Reply[Any] | None:
        command = intake.command
        if isinstance(command, UnloadCommand) and command.all:
            return self._unload_all(intake, command)
        job, joined = await self._submit(intake)
        if getattr(intake.command, "wait", False):
            self._waiting.setdefault(job.job_id, []).append(intake)
            return None
        return intake.reply_ok(
            job_id=job.job_id,
            data=JobAccepted(state=job.state, joined=joined, queue_position=job.queue_position),
        )

    def _unload_all(self, intake: Intake, command: UnloadCommand) -> Reply[JobsQueued]:
        """One unload job per loaded model (pinned ones only with force); the reply
        lists them, each followed on its own jobs/<id> topic."""
        jobs = []
        for name, record in self.lifecycle.models.items():
            if not record.resident or (record.spec.pinned and not command.force):
                continue
            job, _ = self.lifecycle.submit(
                SwapRequest(JobCommand.UNLOAD, name, force=command.force),
                request_id=intake.request_id,
                origin=JobOrigin.BUS,
            )
            jobs.append(JobRef(model=name, job_id=job.job_id))
        return intake.reply_ok(data=JobsQueued(jobs=jobs))

    async def job_finished(self, job: JobState) -> None:
        """Answer everyone who asked to wait for this job, and every cancel of it."""
        outcome = JobOutcome(job=job)
        for intake in self._cancelling.pop(job.job_id, []):
            self._send_reply(intake, intake.reply_ok(job_id=job.job_id, data=outcome))
        for intake in self._waiting.pop(job.job_id, []):
            if job.state == JobStatus.SUCCEEDED:
                reply: Reply[Any] = intake.reply_ok(job_id=job.job_id, data=outcome)
            else:
                error = job.error
                reply = intake.reply_error(
                    CommandError(
                        error.code if error else ErrorCode.INTERNAL,
                        error.message if error else f"job {job.state.value}",
                    ),
                    job_id=job.job_id,
                    data=outcome,
                )
            self._send_reply(intake, reply)

    async def _plan(self, intake: Intake) -> Reply[PlanFits | PlanRefused]:
        command = intake.command
        assert isinstance(command, PlanCommand)
        result, rest = await self.lifecycle.plan(
            command.model, command.gpu, command.exclusive, force=command.force
        )
        return intake.reply_ok(data=describe_plan(command.model, result, rest))

    async def _uninstall(self, intake: Intake) -> Reply[Any]:
        command = intake.command
        assert isinstance(command, UninstallCommand)
        return intake.reply_ok(data=await self.installer.uninstall(command.name))

    async def _cancel(self, intake: Intake) -> Reply[JobOutcome] | None:
        command = intake.command
        assert isinstance(command, CancelCommand)
        job: Job[Any] | None = await self.installer.cancel(command.job_id)
        if job is None:
            job = await self.lifecycle.cancel(command.job_id)
        if job is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no queued or running job {command.job_id!r}")
        if command.wait and not job.finished:
            self._cancelling.setdefault(job.job_id, []).append(intake)
            return None
        return intake.reply_ok(job_id=job.job_id, data=JobOutcome(job=job.snapshot()))


def describe_plan(
    model: str, result: Plan | Refusal, rest: RestPlan | None = None
) -> PlanFits | PlanRefused:
    if isinstance(result, Refusal):
        return PlanRefused(
            model=model,
            code=ErrorCode(result.code),
            message=result.message,
            required_mb=result.required_mb,
            available_mb=result.available_mb,
            evictable_mb=result.evictable_mb,
            gpus=list(result.gpus),
        )
    return PlanFits(
        model=model,
        already_loaded=result.already_loaded,
        gpus=list(result.gpus),
        evict=list(result.evict),
        required_mb=result.required_mb,
        free_before_mb=_by_gpu(result.free_before_mb),
        freed_mb=_by_gpu(result.freed_mb),
        free_after_mb=_by_gpu(result.free_after_mb),
        sleep=list(rest.sleep) if rest else [],
        stop_sleeping=list(rest.stop_sleepers) if rest else [],
    )


def _by_gpu(values: Mapping[int, int]) -> dict[str, int]:
    """JSON object keys are strings."""
    return {str(gpu): value for gpu, value in values.items()}

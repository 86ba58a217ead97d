"""The agent service: wires the GPU backend, the telemetry core and the MQTT
client together and runs them in one TaskGroup until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig, load_config
from agent.database import Database
from agent.discovery_publisher import DiscoveryPublisher
from agent.gpu.base import (
    DriverInfo,
    GpuBackend,
)
from agent.gpu_telemetry import GpuTelemetry
from agent.installer import Installer
from agent.intake import Intake, command_level, read_command, refused_intake
from agent.lifecycle import Lifecycle
from agent.model_commands import ModelCommands
from agent.runtimes.factory import build_runtimes
from agent.telemetry import gpu_info, host_state
from bus.mqtt import (
    MAX_PUBLISH_BYTES,
    Connection,
    ConnectionSettings,
    Message,
    ReconnectingClient,
    Subscription,
    Will,
    settings_from_config,
)
from bus.settings import ConfigError
from shared import PROTOCOL_VERSION
from shared.commands import MAX_COMMAND_BYTES, CommandError
from shared.messages import (
    Availability,
    ErrorCode,
    Event,
    GpuState,
    HostInfo,
    HostState,
    JobState,
    ModelState,
    Reply,
    Severity,
    WeightsState,
    encode,
    utc_now,
)
from shared.topics import CommandName, HostTopics

log = logging.getLogger("modelbus.agent")

CommandHandler = Callable[[Intake], Awaitable[Reply | None]]
# How long a clean shutdown may spend telling the broker we are going offline.
OFFLINE_PUBLISH_TIMEOUT_S = 2.0
# Commands received (and so acknowledged to their senders) but not yet read, at most:
# past this a command is answered ``busy`` at once instead of being executed.
MAX_WAITING_COMMANDS = 1000
# How many of the most recently finished jobs a status reply lists (besides all active ones).
STATUS_RECENT_JOBS = 20


def connection_settings(config: AgentConfig, topics: HostTopics) -> ConnectionSettings:
    return settings_from_config(
        config.broker,
        config.client_id,
        persistent_session=True,
        will=Will(topics.status, Availability.OFFLINE.value.encode(), qos=1, retain=True),
    )


class AgentService:
    def __init__(self, config: AgentConfig, backend: GpuBackend) -> None:
        self.config = config
        self.backend = backend
        self.topics = HostTopics(config.prefix, config.host_id)
        self.started_at = utc_now()
        # Retained commands we cleared: their empty echo is not a new command.
        self._pending_clears: set[str] = set()
        self.store = Database.open(config.state_dir / "modelbus.db")
        self.lifecycle = Lifecycle(
            config.catalog,
            config.lifecycle,
            build_runtimes(config),
            self.store,
            self,
            lambda: self.telemetry.fresh_samples(),
            lambda: [sample.index for sample in self.telemetry.samples],
            sim_state_file=str(config.sim_state_file) if config.gpu.backend == "sim" else None,
        )
        self.installer = Installer(
            config.weights,
            config.weights_dir,
            config.catalog,
            self.store,
            self,
            model_loaded=lambda name: name in self.lifecycle.loaded_models(),
        )
        self.model_commands = ModelCommands(self.lifecycle, self.installer, self._send_reply)
        self._weights: WeightsState | None = None
        self.handlers: dict[str, CommandHandler] = {
            CommandName.STATUS: self._status,
            **self.model_commands.handlers(),
        }
        self._job_clearers: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, JobState] = {}
        subscriptions = [Subscription(self.topics.command_filter, 1, retain_as_published=True)]
        ha = config.homeassistant
        self._ha_status = f"{ha.discovery_prefix}/status"
        if ha.enabled:
            # Home Assistant's birth: after its restart, discovery must be sent again.
            subscriptions.append(Subscription(self._ha_status, 1))
        self._state_pending: asyncio.Task[None] | None = None
        self.client = ReconnectingClient(
            connection_settings(config, self.topics),
            subscriptions=subscriptions,
            on_connected=self._on_connected,
            on_message=self._on_message,
            # Events, replies and job states published while the broker is away are
            # delivered once it is back, not lost.
            queue_while_offline=True,
            name="agent",
        )
        self._protocol: str = "5"
        self.discovery = DiscoveryPublisher(
            ha,
            self.topics,
            self.client,
            config.state_dir / "homeassistant-discovery.json",
            host_info=self.host_info,
            # Every model the state can name: the catalog, and a model still running
            # after it left the catalog (Home Assistant refuses a state not in options).
            models=lambda: sorted(set(self.lifecycle.catalog.names()) | set(self.lifecycle.models)),
        )
        self.telemetry = GpuTelemetry(
            config.telemetry,
            config.alerts,
            backend,
            self.topics,
            self.client,
            owner_of=self.lifecycle.owner_of,
            host_state=self._host_state,
            event=self._event,
            gpus_sampled=self.discovery.gpus_sampled,
        )

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Query the GPUs once; raises GpuUnavailableError with a user-facing sentence."""
        await self.telemetry.start()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises BrokerRefusedError on bad credentials."""
        if self.telemetry.driver is None:
            await self.start()
        await self.lifecycle.start()
        await self.installer.start()
        await self.discovery.start()
        async with asyncio.TaskGroup() as group:
            client_task = group.create_task(self.client.run(), name="mqtt")
            telemetry_task = group.create_task(self.telemetry.run(), name="telemetry")
            lifecycle_task = group.create_task(self.lifecycle.run(), name="lifecycle")
            installer_task = group.create_task(self.installer.run(), name="installer")
            await stop.wait()
            # Model servers keep running: the next agent adopts them. A download stops
            # (its child process with it); installing again resumes from the files done.
            self.lifecycle.stop()
            self.installer.stop()
            lifecycle_task.cancel()
            installer_task.cancel()
            await self._announce_offline()
            telemetry_task.cancel()
            client_task.cancel()
            for clearer in self._job_clearers:
                clearer.cancel()
            self.discovery.stop()
            if self._state_pending is not None:
                self._state_pending.cancel()
        await asyncio.to_thread(self.backend.close)
        await asyncio.to_thread(self.store.close)

    async def _announce_offline(self) -> None:
        """A deliberate shutdown: say ``offline`` ourselves, deliver what is queued, and
        only then let the connection close with a DISCONNECT (which cancels the will)."""
        self.client.publish(self.topics.status, Availability.OFFLINE.value, qos=1, retain=True)
        if not await self.client.close(OFFLINE_PUBLISH_TIMEOUT_S):
            log.warning(
                "could not deliver 'offline' and %d queued messages in time; "
                "the broker's will says 'offline' instead",
                self.client.waiting,
            )

    def _host_state(self, gpus: list[GpuState]) -> HostState:
        running = self.lifecycle.active_job
        return host_state(
            gpus,
            utc_now(),
            loaded_models=self.lifecycle.loaded_models(),
            queue_length=self.lifecycle.queue_length,
            active_job=running.job_id if running else None,
            active_job_progress=running.progress if running else None,
        )

    def host_info(self) -> HostInfo:
        driver = self.telemetry.driver or DriverInfo(self.backend.name, None, None)
        return HostInfo(
            host_id=self.config.host_id,
            hostname=socket.gethostname(),
            agent_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            mqtt_protocol="3.1.1" if self._protocol == "3.1.1" else "5",
            gpu_backend=driver.backend,
            driver_version=driver.driver_version,
            cuda_version=driver.cuda_version,
            gpus=[gpu_info(sample) for sample in self.telemetry.samples],
            commands=sorted(self.handlers),
            started_at=self.started_at,
            ts=utc_now(),
        )

    # ---- connection ------------------------------------------------------

    async def _on_connected(self, connection: Connection) -> None:
        """Republish every retained topic, then announce ``online``: a watcher that sees
        ``online`` can trust the retained state beside it (one outbox, sent in order).
        What was queued while offline (events, replies, cleared jobs) goes first."""
        self._protocol = connection.protocol
        self.client.publish(self.topics.info, encode(self.host_info()), qos=1, retain=True)
        await self.discovery.publish()
        for record in self.lifecycle.models.values():
            self.client.publish(
                self.topics.model(record.spec.name), encode(record.snapshot()), qos=1, retain=True
            )
        for job in list(self._jobs.values()):
            self.client.publish(self.topics.job(job.job_id), encode(job), qos=1, retain=True)
        if self._weights is not None:
            self.client.publish(self.topics.weights, encode(self._weights), qos=1, retain=True)
        await self.telemetry.republish()
        self.client.publish(self.topics.status, Availability.ONLINE.value, qos=1, retain=True)

    async def _event(self, event: Event) -> None:
        if not self.config.alerts.allows(event.event_type):
            return  # an alert the operator switched off
        log.log(
            logging.ERROR
            if event.severity in (Severity.ERROR, Severity.CRITICAL)
            else logging.INFO,
            "event %s: %s",
            event.event_type,
            event.message,
        )
        # Queued while offline: an event raised before the first connect still arrives.
        self.client.publish(self.topics.events, encode(event), qos=1)

    # ---- commands --------------------------------------------------------

    async def _on_message(self, connection: Connection, message: Message) -> None:
        if message.topic == self._ha_status:
            if message.payload.strip() == b"online":
                self.discovery.schedule()
            return
        level = command_level(self.topics, message.topic)
        if level is None:
            return
        if message.topic in self._pending_clears and not message.payload:
            self._pending_clears.discard(message.topic)
            return
        try:
            intake = read_command(
                self.topics,
                level,
                message.payload,
                retained=message.retain,
                response_topic=message.response_topic,
                correlation_data=message.correlation_data,
                max_bytes=MAX_COMMAND_BYTES,
            )
        except Exception:  # a bug in reading must cost one error reply, not the agent
            log.exception("could not read a command on %.200s", message.topic)
            intake = refused_intake(
                self.topics,
                level,
                CommandError(
                    ErrorCode.INTERNAL, "the agent failed to read the command; see its log"
                ),
                correlation_data=message.correlation_data,
            )
        if message.retain:
            self._pending_clears.add(message.topic)
            self.client.publish(message.topic, b"", qos=1, retain=True)
        waiting = connection.backlog
        if intake.command is not None and waiting >= MAX_WAITING_COMMANDS:
            # Already acknowledged to its sender: it gets a refusal, never silence.
            reply: Reply | None = intake.reply_error(
                CommandError(
                    ErrorCode.BUSY,
                    f"the agent has {waiting} commands waiting to be read (at most "
                    f"{MAX_WAITING_COMMANDS}); the command was not executed, try again shortly",
                )
            )
        else:
            reply = await self._execute(intake)
        if reply is not None:
            self._send_reply(intake, reply)

    def _send_reply(self, intake: Intake, reply: Reply) -> None:
        if reply.status == "error" and reply.error is not None:
            log.info(
                "command %s refused (%s): %s",
                intake.command_name,
                reply.error.code,
                reply.error.message,
            )
        try:
            payload = encode(reply)
        except ValueError:  # nothing the sender wrote should get here; if it does, say so
            log.exception("the reply to a %s command could not be encoded", intake.command_name)
            payload = encode(
                intake.reply_error(
                    CommandError(
                        ErrorCode.INTERNAL, "the agent could not encode its reply; see its log"
                    ),
                    fresh_request_id=True,
                )
            )
        if len(payload) > MAX_PUBLISH_BYTES:
            log.error("the reply to a %s command is %d bytes", intake.command_name, len(payload))
            payload = encode(
                intake.reply_error(
                    CommandError(
                        ErrorCode.INTERNAL,
                        f"the reply is {len(payload)} bytes, more than a message may carry "
                        f"({MAX_PUBLISH_BYTES}); see the agent's log",
                    )
                )
            )
        self.client.publish(
            intake.route.topic,
            payload,
            qos=1,
            correlation_data=intake.route.correlation_data,
        )

    async def _execute(self, intake: Intake) -> Reply | None:
        if intake.error is not None or intake.command is None:
            return intake.reply_error()
        handler = self.handlers.get(intake.command_name)
        if handler is None:
            return intake.reply_error(
                CommandError(
                    ErrorCode.UNKNOWN_COMMAND,
                    f"this agent does not execute {intake.command_name!r} yet; "
                    f"it executes: {', '.join(sorted(self.handlers))}",
                )
            )
        try:
            reply = await handler(intake)
        except CommandError as error:
            return intake.reply_error(error)
        except Exception:  # one bad command must never take the agent down
            log.exception("command %s failed", intake.command_name)
            return intake.reply_error(
                CommandError(
                    ErrorCode.INTERNAL, "the agent failed to execute the command; see its log"
                )
            )
        await self.state_changed()
        return reply

    async def _status(self, intake: Intake) -> Reply:
        state = self.telemetry.state
        return intake.reply_ok(
            data={
                "info": self.host_info().model_dump(mode="json"),
                "state": state.model_dump(mode="json") if state else None,
                "gpus": [gpu.model_dump(mode="json") for gpu in self.telemetry.gpus],
                "models": [
                    record.snapshot().model_dump(mode="json")
                    for record in self.lifecycle.models.values()
                ],
                "jobs": [job.model_dump(mode="json") for job in self._status_jobs()],
                "weights": self._weights.model_dump(mode="json") if self._weights else None,
            }
        )

    def _status_jobs(self) -> list[JobState]:
        """Every queued or running job and the most recent finished ones: all retained
        jobs could make the reply larger than the broker accepts after a burst."""
        active = [job for job in self._jobs.values() if job.finished_at is None]
        finished = sorted(
            (job for job in self._jobs.values() if job.finished_at is not None),
            key=lambda job: job.finished_at or job.ts,
        )
        return active + finished[-STATUS_RECENT_JOBS:]

    # ---- the lifecycle's publisher ---------------------------------------

    async def model_changed(self, state: ModelState) -> None:
        self.client.publish(self.topics.model(state.name), encode(state), qos=1, retain=True)
        await self.state_changed()

    async def model_removed(self, name: str) -> None:
        """An empty retained payload removes the model's topic from the broker."""
        self.client.publish(self.topics.model(name), b"", qos=1, retain=True)
        # It was a select option while it ran after leaving the catalog: not any more.
        await self.discovery.publish()

    async def reload(self, config_path: Path | None, overrides: Mapping[str, Any]) -> None:
        """Re-read the catalog (SIGHUP); a broken file changes nothing."""
        try:
            config = load_config(config_path, overrides=overrides)
        except ConfigError as exc:
            log.error("catalog not reloaded: %s", exc)
            return
        changes = await self.lifecycle.reload(config.catalog)
        log.info("catalog reloaded: %s", "; ".join(changes) or "no changes")
        self.client.publish(self.topics.info, encode(self.host_info()), qos=1, retain=True)
        await self.discovery.publish()

    async def job_changed(self, job: JobState) -> None:
        # Kept until cleared, so a reconnect republishes finished jobs too.
        self._jobs[job.job_id] = job
        self.client.publish(self.topics.job(job.job_id), encode(job), qos=1, retain=True)

    async def job_finished(self, job: JobState) -> None:
        await self.model_commands.job_finished(job)
        clearer = asyncio.create_task(self._clear_job_later(job.job_id))
        self._job_clearers.add(clearer)
        clearer.add_done_callback(self._job_clearers.discard)

    async def _clear_job_later(self, job_id: str) -> None:
        """Finished jobs stay visible for a while, then leave the retained store."""
        await asyncio.sleep(self.config.lifecycle.job_retention_s)
        self._jobs.pop(job_id, None)
        self.client.publish(self.topics.job(job_id), b"", qos=1, retain=True)

    async def event(self, event: Event) -> None:
        await self._event(event)

    async def weights_changed(self, state: WeightsState) -> None:
        self._weights = state
        self.client.publish(self.topics.weights, encode(state), qos=1, retain=True)

    async def state_changed(self) -> None:
        """Publish ``state`` shortly, once for all the changes until then."""
        if self._state_pending is None or self._state_pending.done():
            self._state_pending = asyncio.get_running_loop().create_task(
                self.telemetry.publish_state()
            )

"""The agent service: wires the GPU backend, the telemetry core and the MQTT
client together and runs them in one TaskGroup until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent import __version__
from agent.alerts import AlertTracker
from agent.alerts import to_event as alert_event
from agent.config import AgentConfig, load_config
from agent.database import Database
from agent.gpu.base import (
    ChangeSignal,
    DriverInfo,
    GpuBackend,
    GpuSample,
    GpuUnavailableError,
)
from agent.ha_discovery import Published, discovery_payload, with_removals
from agent.installer import Installer
from agent.intake import Intake, command_level, read_command, refused_intake
from agent.lifecycle import Lifecycle
from agent.model_commands import ModelCommands
from agent.runtimes.factory import build_runtimes
from agent.telemetry import GPU_LOST, ChangeFilter, gpu_info, gpu_state, host_state
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

T = TypeVar("T")
CommandHandler = Callable[[Intake], Awaitable[Reply | None]]
# How long a clean shutdown may spend telling the broker we are going offline.
OFFLINE_PUBLISH_TIMEOUT_S = 2.0
# Commands received (and so acknowledged to their senders) but not yet read, at most:
# past this a command is answered ``busy`` at once instead of being executed.
MAX_WAITING_COMMANDS = 1000
# How long changes of the host state (queue length, active job, models) are gathered
# before ``state`` is published: a burst of commands changes the queue with each one.
STATE_COALESCE_S = 0.05
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
        self.driver: DriverInfo | None = None
        self.gpus: list[GpuState] = []
        self.state: HostState | None = None
        self._samples: tuple[GpuSample, ...] = ()
        self._changes = ChangeFilter()
        # Sampling and publishing of telemetry never interleave: a reconnect's
        # republish and a change-triggered publish would otherwise race.
        self._telemetry_lock = asyncio.Lock()
        # Retained commands we cleared: their empty echo is not a new command.
        self._pending_clears: set[str] = set()
        self.store = Database.open(config.state_dir / "modelbus.db")
        self.lifecycle = Lifecycle(
            config.catalog,
            config.lifecycle,
            build_runtimes(config),
            self.store,
            self,
            self._fresh_samples,
            lambda: [sample.index for sample in self._samples],
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
        self._ha = config.homeassistant
        self._ha_status = f"{self._ha.discovery_prefix}/status"
        if self._ha.enabled:
            # Home Assistant's birth: after its restart, discovery must be sent again.
            subscriptions.append(Subscription(self._ha_status, 1))
        self._discovery_pending: asyncio.Task[None] | None = None
        self._state_pending: asyncio.Task[None] | None = None
        self._alerts = AlertTracker(config.alerts)
        self._discovered_gpus: tuple[int, ...] = ()
        # What our discovery topic holds, kept across restarts: Home Assistant needs to be
        # told which components went away, and needs a cleared config only once.
        self._ha_file = config.state_dir / "homeassistant-discovery.json"
        self._ha_published: Published | None = None
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

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Query the GPUs once; raises GpuUnavailableError with a user-facing sentence."""
        self.driver = await self._call(self.backend.driver_info)
        await self._sample()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises BrokerRefusedError on bad credentials."""
        if self.driver is None:
            await self.start()
        await self.lifecycle.start()
        await self.installer.start()
        self._ha_published = await asyncio.to_thread(self._read_published)
        async with asyncio.TaskGroup() as group:
            client_task = group.create_task(self.client.run(), name="mqtt")
            telemetry_task = group.create_task(self._telemetry_loop(), name="telemetry")
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
            for pending in (self._discovery_pending, self._state_pending):
                if pending is not None:
                    pending.cancel()
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

    async def _call(self, fn: Callable[[], T]) -> T:
        """Blocking backend calls run off the event loop, under a timeout (asyncio.timeout,
        not wait_for, which on Python 3.11 can swallow a cancellation)."""
        async with asyncio.timeout(self.config.telemetry.sample_timeout_s):
            return await asyncio.to_thread(fn)

    # ---- telemetry -------------------------------------------------------

    async def _fresh_samples(self) -> tuple[GpuSample, ...]:
        return await self._call(self.backend.sample)

    def _host_state(self) -> HostState:
        running = self.lifecycle.active_job
        return host_state(
            self.gpus,
            utc_now(),
            loaded_models=self.lifecycle.loaded_models(),
            queue_length=self.lifecycle.queue_length,
            active_job=running.job_id if running else None,
            active_job_progress=running.progress if running else None,
        )

    async def _sample(self) -> None:
        previous = {s.index: s.lost for s in self._samples}
        self._samples = await self._call(self.backend.sample)
        ts = utc_now()
        gpus = [gpu_state(sample, ts, self.lifecycle.owner_of) for sample in self._samples]
        # Threshold alerts (with hysteresis) judge the fresh figures; each start and
        # clear is one event, and what is active goes into the GPU's alerts list.
        changes = self._alerts.update(gpus, time.monotonic())
        self.gpus = [_with_alerts(gpu, self._alerts.active(gpu.index)) for gpu in gpus]
        for change in changes:
            await self._event(alert_event(change))
        indices = tuple(sample.index for sample in self._samples)
        if self._discovered_gpus and indices != self._discovered_gpus:
            self._discovered_gpus = indices
            self._schedule_discovery()
        self.state = self._host_state()
        for sample in self._samples:
            if sample.lost and not previous.get(sample.index, False):
                await self._event(
                    Event(
                        event_type=GPU_LOST,
                        severity=Severity.CRITICAL,
                        message=f"GPU {sample.index} ({sample.name}) stopped answering",
                        gpu=sample.index,
                    )
                )

    async def _telemetry_loop(self) -> None:
        telemetry = self.config.telemetry
        signal = self.backend.change_signal() if telemetry.publish_on_change else None
        if signal is not None:
            await self._follow_change_signal(signal)
        elif telemetry.publish_on_change:
            await self._poll_for_changes()
        else:
            while True:
                await asyncio.sleep(telemetry.interval_s)
                await self._refresh(publish_all=True)

    async def _follow_change_signal(self, signal: ChangeSignal) -> None:
        """Sleep until a writer announces a change, a silent change falls due (memory
        coming back after a release) or the periodic tick: no polling while idle."""
        telemetry = self.config.telemetry
        changed = asyncio.Event()

        def on_readable() -> None:
            # Drain here: the reader is level-triggered and would otherwise spin.
            signal.drain()
            changed.set()

        loop = asyncio.get_running_loop()
        loop.add_reader(signal.fileno(), on_readable)
        try:
            next_tick = time.monotonic() + telemetry.interval_s
            while True:
                timeout = next_tick - time.monotonic()
                due = signal.next_due_s()
                if due is not None:
                    timeout = min(timeout, due)
                if timeout > 0 and not changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await changed.wait()
                changed.clear()
                tick = time.monotonic() >= next_tick
                if tick:
                    next_tick = time.monotonic() + telemetry.interval_s
                await self._refresh(publish_all=tick)
                if not tick:
                    # A loading server changes memory many times a second: coalesce.
                    await asyncio.sleep(telemetry.change_coalesce_s)
        finally:
            loop.remove_reader(signal.fileno())

    async def _poll_for_changes(self) -> None:
        """For backends without notifications: compare a cheap signature between ticks."""
        telemetry = self.config.telemetry
        next_tick = time.monotonic() + telemetry.interval_s
        signature = await self._signature()
        while True:
            await asyncio.sleep(
                max(0.0, min(telemetry.watch_interval_s, next_tick - time.monotonic()))
            )
            current = await self._signature()
            tick = time.monotonic() >= next_tick
            if tick:
                next_tick = time.monotonic() + telemetry.interval_s
            if tick or current != signature:
                signature = current
                await self._refresh(publish_all=tick)

    async def _signature(self) -> tuple[int, ...]:
        try:
            return await self._call(self.backend.memory_signature)
        except (GpuUnavailableError, TimeoutError) as exc:
            log.warning("GPU change watch failed: %s", exc or "timed out")
            return ()

    async def _refresh(self, *, publish_all: bool) -> None:
        async with self._telemetry_lock:
            try:
                await self._sample()
            except (GpuUnavailableError, TimeoutError) as exc:
                log.error("GPU sampling failed: %s", exc or "timed out")
                return
            # Without a connection there is nothing to tell: the next connect
            # republishes every GPU and the state.
            if self.client.connection is not None:
                self._publish_telemetry(publish_all=publish_all)

    def _publish_telemetry(self, *, publish_all: bool) -> None:
        for gpu in self.gpus:
            topic = self.topics.gpu(gpu.index)
            if self._changes.changed(topic, gpu) or publish_all:
                self.client.publish(topic, encode(gpu), qos=0, retain=True)
        assert self.state is not None
        if self._changes.changed(self.topics.state, self.state) or publish_all:
            self.client.publish(self.topics.state, encode(self.state), qos=0, retain=True)

    def host_info(self) -> HostInfo:
        driver = self.driver or DriverInfo(self.backend.name, None, None)
        return HostInfo(
            host_id=self.config.host_id,
            hostname=socket.gethostname(),
            agent_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            mqtt_protocol="3.1.1" if self._protocol == "3.1.1" else "5",
            gpu_backend=driver.backend,
            driver_version=driver.driver_version,
            cuda_version=driver.cuda_version,
            gpus=[gpu_info(sample) for sample in self._samples],
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
        await self._publish_discovery()
        for record in self.lifecycle.models.values():
            self.client.publish(
                self.topics.model(record.spec.name), encode(record.snapshot()), qos=1, retain=True
            )
        for job in list(self._jobs.values()):
            self.client.publish(self.topics.job(job.job_id), encode(job), qos=1, retain=True)
        if self._weights is not None:
            self.client.publish(self.topics.weights, encode(self._weights), qos=1, retain=True)
        async with self._telemetry_lock:
            self._changes.forget()
            self._publish_telemetry(publish_all=True)
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
                self._schedule_discovery()
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
        return intake.reply_ok(
            data={
                "info": self.host_info().model_dump(mode="json"),
                "state": self.state.model_dump(mode="json") if self.state else None,
                "gpus": [gpu.model_dump(mode="json") for gpu in self.gpus],
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
        await self._publish_discovery()

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
        await self._publish_discovery()

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

    # ---- Home Assistant ----------------------------------------------------

    async def _publish_discovery(self) -> None:
        """The host's retained discovery config. Turned off: an empty one, once, which
        makes Home Assistant remove the device (sent again on every connect, it made Home
        Assistant log a clean-up warning each time)."""
        topic = self.topics.discovery_config(self._ha.discovery_prefix)
        if not self._ha.enabled:
            if self._ha_published is None or not self._ha_published.cleared:
                self.client.publish(topic, b"", qos=1, retain=True)
                await self._remember_published(Published({}, cleared=True))
            return
        info = self.host_info()
        self._discovered_gpus = tuple(gpu.index for gpu in info.gpus)
        payload = discovery_payload(
            self.topics,
            hostname=info.hostname,
            agent_version=info.agent_version,
            gpus=info.gpus,
            # Every model the state can name: the catalog, and a model still running
            # after it left the catalog (Home Assistant refuses a state not in options).
            models=sorted(set(self.lifecycle.catalog.names()) | set(self.lifecycle.models)),
            gpu_backend=info.gpu_backend,
        )
        payload, published = with_removals(payload, self._ha_published)
        self.client.publish(topic, json.dumps(payload), qos=1, retain=True)
        if published != self._ha_published:
            await self._remember_published(published)

    def _read_published(self) -> Published | None:
        try:
            return Published.from_json(self._ha_file.read_text())
        except OSError:
            return None

    async def _remember_published(self, published: Published) -> None:
        self._ha_published = published
        try:
            await asyncio.to_thread(self._ha_file.write_text, published.to_json())
        except OSError as exc:
            log.warning("could not remember the discovery config in %s: %s", self._ha_file, exc)

    def _schedule_discovery(self) -> None:
        """One republish per announcement, after a random delay; announcements that
        come while one is pending join it, so a flapping Home Assistant cannot flood."""
        if not self._ha.enabled:
            return
        if self._discovery_pending is not None and not self._discovery_pending.done():
            return

        async def later() -> None:
            await asyncio.sleep(random.uniform(0, self._ha.republish_delay_max_s))
            await self._publish_discovery()

        self._discovery_pending = asyncio.get_running_loop().create_task(later())

    async def weights_changed(self, state: WeightsState) -> None:
        self._weights = state
        self.client.publish(self.topics.weights, encode(state), qos=1, retain=True)

    async def state_changed(self) -> None:
        """Publish ``state`` shortly, once for all the changes until then."""
        if self._state_pending is None or self._state_pending.done():
            self._state_pending = asyncio.get_running_loop().create_task(self._publish_state())

    async def _publish_state(self) -> None:
        await asyncio.sleep(STATE_COALESCE_S)
        if not self.gpus:
            return
        self.state = self._host_state()
        if self._changes.changed(self.topics.state, self.state):
            self.client.publish(self.topics.state, encode(self.state), qos=0, retain=True)


def _with_alerts(gpu: GpuState, active: list[str]) -> GpuState:
    """The GPU's state with the threshold alerts active on it (no copy when none)."""
    return gpu.model_copy(update={"alerts": [*gpu.alerts, *active]}) if active else gpu

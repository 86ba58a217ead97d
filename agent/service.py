"""The agent service: wiring. The GPU telemetry, the lifecycle, the installer, the
command dispatcher and the host's publisher, around one bus client, in one TaskGroup
until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.background import Background, Debounced
from agent.catalog import Catalog
from agent.catalog_commands import CatalogCommands
from agent.catalog_store import BusCatalog, merged
from agent.config import AgentConfig, load_config
from agent.database import Database
from agent.discovery_publisher import DiscoveryPublisher
from agent.dispatch import CommandDispatcher
from agent.gpu.base import DriverInfo, GpuBackend
from agent.gpu_telemetry import STATE_COALESCE_S, GpuTelemetry
from agent.host_publisher import HostPublisher
from agent.installer import Installer
from agent.intake import Intake
from agent.lifecycle import Lifecycle
from agent.model_commands import ModelCommands
from agent.read_commands import ReadCommands
from agent.runtimes.factory import add_runtimes, build_runtimes
from agent.telemetry import gpu_info, host_state
from bus.mqtt import (
    Connection,
    ConnectionSettings,
    Message,
    Subscription,
    Will,
    settings_from_config,
)
from bus.reconnecting import ReconnectingClient
from bus.settings import ConfigError
from shared import PROTOCOL_VERSION
from shared.messages import (
    Availability,
    GpuState,
    HostInfo,
    HostState,
    JobState,
    Reply,
    encode,
    utc_now,
)
from shared.replies import HostStatus
from shared.topics import CommandName, HostTopics

if TYPE_CHECKING:
    from agent.gateway.server import GatewayServer

log = logging.getLogger("modelbus.agent")

# How long a clean shutdown may spend telling the broker we are going offline.
OFFLINE_PUBLISH_TIMEOUT_S = 2.0


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
        self.background = Background()
        self.store = Database.open(config.state_dir / "modelbus.db")
        subscriptions = [
            Subscription(topic, 1, retain_as_published=True)
            for topic in (self.topics.command_filter, self.topics.admin_command_filter)
        ]
        ha = config.homeassistant
        self._ha_status = f"{ha.discovery_prefix}/status"
        if ha.enabled:
            # Home Assistant's birth: after its restart, discovery must be sent again.
            subscriptions.append(Subscription(self._ha_status, 1))
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
        self.dispatcher = CommandDispatcher(
            self.topics, self.client, self.background, executed=self._executed
        )
        self._publish_state = Debounced(
            self.background,
            lambda: self.telemetry.publish_state(),
            delay_s=STATE_COALESCE_S,
            name="publish-state",
        )
        self.publisher = HostPublisher(
            self.topics,
            self.client,
            self.background,
            alerts=config.alerts,
            job_retention_s=config.lifecycle.job_retention_s,
            job_ended=lambda job: self.model_commands.job_finished(job),
            catalog_changed=lambda: self.discovery.publish(),
            state_changed=self._publish_state.trigger,
        )
        # The configuration's models and those added over the bus (catalog_store.py).
        self._catalog_config = config
        self.bus_catalog = BusCatalog(config.state_dir)
        self.bus_catalog.load()
        catalog = merged(config, self.bus_catalog.entries)
        self.lifecycle = Lifecycle(
            catalog,
            config.lifecycle,
            build_runtimes(config, catalog),
            self.store,
            self.publisher,
            self.background,
            lambda: self.telemetry.fresh_samples(),
            lambda: [sample.index for sample in self.telemetry.samples],
            sim_state_file=str(config.sim_state_file) if config.gpu.backend == "sim" else None,
        )
        self.installer = Installer(
            config.weights,
            config.weights_dir,
            catalog,
            self.store,
            self.publisher,
            self.background,
            model_loaded=lambda name: name in self.lifecycle.loaded_models(),
        )
        self.model_commands = ModelCommands(
            self.lifecycle, self.installer, self.dispatcher.send_reply
        )
        self.dispatcher.register({CommandName.STATUS: self._status})
        self.dispatcher.register(
            self.model_commands.handlers(), beside=self.model_commands.slow_commands
        )
        self.dispatcher.register(ReadCommands(self.lifecycle.registry, self.store).handlers())
        self.catalog_commands = CatalogCommands(
            lambda: self._catalog_config,
            self.bus_catalog,
            self.installer.weights,
            self.apply_catalog,
            lambda: self.lifecycle.catalog,
        )
        self.dispatcher.register(self.catalog_commands.handlers())
        self.discovery = DiscoveryPublisher(
            ha,
            self.topics,
            self.client,
            self.background,
            config.state_dir / "homeassistant-discovery.json",
            host_info=self.host_info,
            # Every model the state can name: the catalog, and a model still running
            # after it left the catalog (Home Assistant refuses a state not in options).
            models=lambda: sorted(set(self.lifecycle.catalog.names()) | set(self.lifecycle.models)),
        )
        self.gateway: GatewayServer | None = None
        if config.http.listen is not None:
            self.gateway = self._http_server(config)
        self.telemetry = GpuTelemetry(
            config.telemetry,
            config.alerts,
            backend,
            self.topics,
            self.client,
            owner_of=self.lifecycle.owner_of,
            host_state=self._host_state,
            event=self.publisher.event,
            gpus_sampled=self.discovery.gpus_sampled,
        )

    def _http_server(self, config: AgentConfig) -> GatewayServer:
        # Imported only when serving HTTP: aiohttp alone costs 12 MiB of memory.
        from agent.event_feed import EventFeed
        from agent.gateway.admission import Admission
        from agent.gateway.control import HostView
        from agent.gateway.server import GatewayServer
        from agent.metrics import AgentMetrics, AgentState

        metrics = AgentMetrics(
            AgentState(
                gpus=lambda: self.telemetry.gpus,
                models=lambda: [record.snapshot() for record in self.lifecycle.models.values()],
                queued=lambda: {
                    "swap": self.lifecycle.queue_length,
                    "install": len(self.installer.worker.queue),
                },
                version=__version__,
                protocol_version=PROTOCOL_VERSION,
            )
        )
        self.publisher.job_observers.append(metrics)
        admission = Admission(
            self.lifecycle,
            self.publisher,
            self.background,
            queue_timeout_s=config.http.queue_timeout_s,
            batching=config.gateway,
            admitted=metrics.request_admitted,
        )
        events = EventFeed(self.topics)
        self.client.publish_observers.append(events.published)
        view = HostView(
            host_id=config.host_id,
            status=self.host_status,
            state=lambda: self.telemetry.state,
            job=self._job,
            history=lambda limit: asyncio.to_thread(self.store.recent_jobs, limit),
            call=self.dispatcher.call,
            events=events,
        )
        return GatewayServer(config.http, self.lifecycle, admission, metrics, view)

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Query the GPUs once; raises GpuUnavailableError with a user-facing sentence."""
        await self.telemetry.start()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises BrokerRefusedError on bad credentials."""
        if self.telemetry.driver is None:
            await self.start()
        try:
            await self.lifecycle.start()
            await self.installer.start()
            await self.discovery.start()
            if self.gateway is not None:
                await self.gateway.start()
            async with asyncio.TaskGroup() as group:
                background_task = group.create_task(self.background.run(), name="background")
                client_task = group.create_task(self.client.run(), name="mqtt")
                telemetry_task = group.create_task(self.telemetry.run(), name="telemetry")
                lifecycle_task = group.create_task(self.lifecycle.run(), name="lifecycle")
                installer_task = group.create_task(self.installer.run(), name="installer")
                gateway_task = (
                    group.create_task(self.gateway.serve(), name="gateway")
                    if self.gateway is not None
                    else None
                )
                await stop.wait()
                if gateway_task is not None:
                    # Requests in flight end here; their callers see the connection close.
                    gateway_task.cancel()
                # Model servers keep running: the next agent adopts them. A download stops
                # (its child process with it); installing again resumes from the files done.
                self.lifecycle.stop()
                self.installer.stop()
                lifecycle_task.cancel()
                installer_task.cancel()
                await self._announce_offline()
                telemetry_task.cancel()
                client_task.cancel()
                background_task.cancel()
        finally:
            if self.gateway is not None:
                await self.gateway.close()
            self.background.close()
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
            commands=self.dispatcher.commands,
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
        self.publisher.republish([record.snapshot() for record in self.lifecycle.models.values()])
        await self.telemetry.republish()
        self.client.publish(self.topics.status, Availability.ONLINE.value, qos=1, retain=True)

    async def _on_message(self, connection: Connection, message: Message) -> None:
        if message.topic == self._ha_status:
            if message.payload.strip() == b"online":
                self.discovery.schedule()
            return
        await self.dispatcher.on_message(connection, message)

    async def _executed(self) -> None:
        # A command may have changed the queue or the models: ``state`` says so, shortly.
        self._publish_state.trigger()

    async def _status(self, intake: Intake) -> Reply[HostStatus]:
        return intake.reply_ok(data=self.host_status())

    def host_status(self) -> HostStatus:
        """What ``status`` answers, on the bus and over HTTP."""
        return HostStatus(
            info=self.host_info(),
            state=self.telemetry.state,
            gpus=self.telemetry.gpus,
            models=[record.snapshot() for record in self.lifecycle.models.values()],
            jobs=self.publisher.status_jobs(),
            weights=self.publisher.weights,
        )

    async def _job(self, job_id: str) -> JobState | None:
        """A retained job, else one from the history (SQLite, off the loop)."""
        retained = self.publisher.jobs.get(job_id)
        if retained is not None:
            return retained
        return await asyncio.to_thread(self.store.job, job_id)

    def request_reload(self, config_path: Path | None, overrides: Mapping[str, Any]) -> None:
        """Reload the catalog soon (a SIGHUP), in the service's TaskGroup."""
        self.background.spawn(self.reload(config_path, overrides), name="reload")

    async def reload(self, config_path: Path | None, overrides: Mapping[str, Any]) -> None:
        """Re-read the catalog (SIGHUP); a broken file changes nothing."""
        try:
            config = await asyncio.to_thread(load_config, config_path, overrides=overrides)
        except ConfigError as exc:
            log.error("catalog not reloaded: %s", exc)
            return
        self._catalog_config = config
        await asyncio.to_thread(self.bus_catalog.load)
        changes = await self.apply_catalog(merged(config, self.bus_catalog.entries))
        log.info("catalog reloaded: %s", "; ".join(changes) or "no changes")

    async def apply_catalog(self, catalog: Catalog) -> list[str]:
        """Take a new catalog (a reload, a catalog command): models as reload_catalog says,
        the runtimes it needs, the weights' users, ``info`` and Home Assistant's options."""
        add_runtimes(self.lifecycle.registry.runtimes, catalog, self.config.host_id)
        changes = await self.lifecycle.reload(catalog)
        self.installer.catalog = catalog
        await self.installer.publish_state()
        self.client.publish(self.topics.info, encode(self.host_info()), qos=1, retain=True)
        await self.discovery.publish()
        return changes

"""Home Assistant's discovery config for this host: published on every connect and
when the GPUs or the models it names change, republished (after a random delay) when
Home Assistant comes back, and remembered across restarts so that components that went
away are removed."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from agent.background import Background, Debounced
from agent.config import HomeAssistantConfig
from agent.ha_discovery import Published, discovery_payload, with_removals
from bus.reconnecting import ReconnectingClient
from shared.messages import HostInfo
from shared.topics import HostTopics

log = logging.getLogger("modelbus.agent")


class DiscoveryPublisher:
    def __init__(
        self,
        config: HomeAssistantConfig,
        topics: HostTopics,
        client: ReconnectingClient,
        background: Background,
        file: Path,
        *,
        host_info: Callable[[], HostInfo],
        models: Callable[[], list[str]],
    ) -> None:
        self._config = config
        self._topics = topics
        self._client = client
        # What our discovery topic holds, kept across restarts: Home Assistant needs to be
        # told which components went away, and needs a cleared config only once.
        self._file = file
        self._published: Published | None = None
        self._host_info = host_info
        self._models = models
        self._gpus: tuple[int, ...] = ()
        # One republish per announcement, after a random delay; announcements that come
        # while one is pending join it, so a flapping Home Assistant cannot flood.
        self._republish = Debounced(
            background,
            self.publish,
            delay_s=lambda: random.uniform(0, config.republish_delay_max_s),
            name="discovery",
        )

    async def start(self) -> None:
        self._published = await asyncio.to_thread(self._read)

    def gpus_sampled(self, indices: tuple[int, ...]) -> None:
        """The GPUs the config names went or came back: send it again."""
        if self._gpus and indices != self._gpus:
            self._gpus = indices
            self.schedule()

    async def publish(self) -> None:
        """The host's retained discovery config. Turned off: an empty one, once, which
        makes Home Assistant remove the device (sent again on every connect, it made Home
        Assistant log a clean-up warning each time)."""
        topic = self._topics.discovery_config(self._config.discovery_prefix)
        if not self._config.enabled:
            if self._published is None or not self._published.cleared:
                self._client.publish(topic, b"", qos=1, retain=True)
                await self._remember(Published({}, cleared=True))
            return
        info = self._host_info()
        self._gpus = tuple(gpu.index for gpu in info.gpus)
        payload = discovery_payload(
            self._topics,
            hostname=info.hostname,
            agent_version=info.agent_version,
            gpus=info.gpus,
            models=self._models(),
            gpu_backend=info.gpu_backend,
        )
        payload, published = with_removals(payload, self._published)
        self._client.publish(topic, json.dumps(payload), qos=1, retain=True)
        if published != self._published:
            await self._remember(published)

    def _read(self) -> Published | None:
        try:
            return Published.from_json(self._file.read_text())
        except OSError:
            return None

    async def _remember(self, published: Published) -> None:
        self._published = published
        try:
            await asyncio.to_thread(self._file.write_text, published.to_json())
        except OSError as exc:
            log.warning("could not remember the discovery config in %s: %s", self._file, exc)

    def schedule(self) -> None:
        """Send the config again shortly (Home Assistant came back, the GPUs changed)."""
        if self._config.enabled:
            self._republish.trigger()

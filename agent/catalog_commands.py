"""The ``catalog`` command: show the catalog, add an entry, remove one, with no file edit.

Who may add what: anyone who may add an entry that names a command line, an image, extra
server arguments or environment may run anything on this host. So an operator (the bus's
``P/H/cmd/catalog``, an operator key over HTTP) may only add a preset server (llama-cpp,
vllm, sglang) serving installed weights, with the keys in OPERATOR_KEYS; everything else
needs the admin role (``P/H/admin/cmd/catalog``, which only admins may write, or an admin
key). The configuration file's ``models:`` are read-only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from agent.catalog import Catalog
from agent.catalog_store import BusCatalog, expand_one, merged
from agent.config import AgentConfig
from agent.intake import Intake
from agent.presets import PRESETS, PresetError, gguf_file
from agent.weights import WeightsDir
from agent.weights_estimate import suggest_catalog_entry
from shared.commands import CatalogCommand, CommandError, describe_validation_error
from shared.messages import ErrorCode, Reply
from shared.replies import CatalogChanged, CatalogEntry, CatalogShown
from shared.topics import CommandName

# What an operator's entry may hold: where and how the model runs among what the host's
# configuration allows, never what it executes.
OPERATOR_PRESETS = frozenset({"llama-cpp", "vllm", "sglang"})
OPERATOR_KEYS = frozenset(
    {
        "preset", "weights", "file", "runtime", "vram_mb", "gpus", "priority", "pinned",
        "ttl_s", "description", "aliases", "hf_repo", "load_timeout_s", "stop_timeout_s",
        "restart", "max_concurrent", "max_queued", "exclusive", "drain_timeout_s",
        "request_timeout_s", "sleep", "sleep_level", "sleep_ram_mb",
    }
)  # fmt: skip
Apply = Callable[[Catalog], Awaitable[list[str]]]


class CatalogCommands:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        store: BusCatalog,
        weights: WeightsDir,
        apply: Apply,
        current: Callable[[], Catalog],
    ) -> None:
        self._config = config
        self._store = store
        self._weights = weights
        self._apply = apply
        self._current = current
        # One change at a time: each reads the file's entries and writes them whole.
        self._changing = asyncio.Lock()

    def handlers(self) -> dict[str, Callable[[Intake], Awaitable[Reply[Any] | None]]]:
        return {CommandName.CATALOG: self._catalog}

    async def _catalog(self, intake: Intake) -> Reply[Any]:
        command = intake.command
        assert isinstance(command, CatalogCommand)
        if command.action == "show":
            return intake.reply_ok(data=self.shown(command.name))
        async with self._changing:
            if command.action == "remove":
                assert command.name is not None
                return intake.reply_ok(data=await self._remove(command.name))
            return intake.reply_ok(data=await self._add(command, admin=intake.admin))

    def shown(self, name: str | None = None) -> CatalogShown:
        names = self._current().names()
        if name is not None and name not in names:
            raise CommandError(
                ErrorCode.UNKNOWN_MODEL,
                f"unknown model {name!r}: the catalog has {', '.join(names) or 'no models'}",
            )
        return CatalogShown(
            models=[self._entry(n) for n in names if name in (None, n)],
            file=str(self._store.path),
        )

    def _entry(self, name: str) -> CatalogEntry:
        spec = self._current().models[name]
        from_bus = name in self._store.entries and name not in self._config().models
        return CatalogEntry(
            name=name,
            source="bus" if from_bus else "config",
            entry=self._store.entries.get(name) if from_bus else None,
            spec=spec.model_dump(mode="json", exclude_defaults=True),
        )

    # ---- add ------------------------------------------------------------------

    async def _add(self, command: CatalogCommand, *, admin: bool) -> CatalogChanged:
        config = self._config()
        entry = dict(command.entry) if command.entry is not None else None
        if entry is None:
            assert command.weights is not None
            entry = await self._suggested(command.weights)
        elif command.weights is not None:
            entry["weights"] = command.weights
        name = command.name or entry.get("weights")
        if not isinstance(name, str):
            raise CommandError(ErrorCode.INVALID_PAYLOAD, "catalog add: give 'name'")
        if name in config.models:
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"{name} is in the configuration file's models:, which the bus cannot change "
                "(the file wins); edit the file, or add it under another name",
            )
        if not admin:
            await self._check_operator_entry(name, entry)
        others = (s.port for n, s in self._current().models.items() if n != name)
        try:
            spec = expand_one(config, name, entry, others)
        except PresetError as error:
            raise CommandError(ErrorCode.INVALID_PAYLOAD, f"models.{name}: {error}") from None
        except ValidationError as error:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD, f"models.{name}: {describe_validation_error(error)}"
            ) from None
        entry.setdefault("port", spec.port)  # the same port at every start
        entries = {**self._store.entries, name: entry}
        catalog = merged(config, entries)
        if name not in catalog:  # an alias another model has, say: merged() says why
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                f"models.{name} does not fit beside the catalog (see the agent's log)",
            )
        await self._save(entries)
        changes = await self._apply(catalog)
        return CatalogChanged(name=name, changes=changes, entry=self._entry(name))

    async def _suggested(self, weights: str) -> dict[str, Any]:
        """The entry the install of ``weights`` suggested: a preset serving them."""
        manifest = await asyncio.to_thread(self._weights.manifest, weights)
        if manifest is None:
            raise CommandError(
                ErrorCode.NOT_FOUND,
                f"no installed weights {weights!r}: install them first "
                f"(modelbus install <repo> --name {weights})",
            )
        path = await asyncio.to_thread(self._weights.path_for, weights)
        gguf = await asyncio.to_thread(gguf_file, path)
        entry = suggest_catalog_entry(
            weights, manifest.repo, manifest.revision, None, gguf=gguf is not None
        )[weights]
        if manifest.vram_estimate_mb is None:
            raise CommandError(
                ErrorCode.INVALID_PAYLOAD,
                f"weights {weights!r} have no VRAM estimate: add them with an entry that "
                "gives vram_mb",
            )
        return {**entry, "vram_mb": manifest.vram_estimate_mb}

    async def _check_operator_entry(self, name: str, entry: dict[str, Any]) -> None:
        """What an operator may add (the module docstring); FORBIDDEN saying what is not."""
        needs_admin = sorted(set(entry) - OPERATOR_KEYS)
        preset = entry.get("preset")
        if preset not in OPERATOR_PRESETS:
            needs_admin.insert(0, f"preset {preset!r}" if preset else "an entry without a preset")
        sleep = entry.get("sleep")
        if sleep is not None and preset in PRESETS and sleep != PRESETS[preset].sleep:
            needs_admin.append(f"sleep {sleep!r}")
        if needs_admin:
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"models.{name}: {', '.join(needs_admin)} decide what runs on this host, which "
                "only an admin may change: send it on the admin topic (P/H/admin/cmd/catalog) "
                "or with an admin key; an operator adds a preset (llama-cpp, vllm, sglang) "
                "serving installed weights",
            )
        weights = entry.get("weights")
        installed = (
            await asyncio.to_thread(self._weights.manifest, weights)
            if isinstance(weights, str)
            else None
        )
        if installed is None:
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"models.{name}: an operator's entry serves installed weights ('weights': the "
                "name of an install)"
                + (f"; {weights!r} is not installed" if isinstance(weights, str) else ""),
            )

    # ---- remove -----------------------------------------------------------------

    async def _remove(self, name: str) -> CatalogChanged:
        if name in self._config().models:
            raise CommandError(
                ErrorCode.FORBIDDEN,
                f"{name} is in the configuration file's models:, which the bus cannot change",
            )
        if name not in self._store.entries:
            raise CommandError(
                ErrorCode.NOT_FOUND, f"no catalog entry {name!r} was added over the bus"
            )
        entries = {n: e for n, e in self._store.entries.items() if n != name}
        await self._save(entries)
        changes = await self._apply(merged(self._config(), entries))
        return CatalogChanged(name=name, changes=changes)

    async def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        previous, self._store.entries = self._store.entries, entries
        try:
            await asyncio.to_thread(self._store.save)
        except OSError as error:
            self._store.entries = previous
            raise CommandError(
                ErrorCode.INTERNAL,
                f"could not write {self._store.path} ({error.strerror}); nothing changed",
            ) from None

"""The JSON admin API: every registry entry with its state, and load / unload commands.

``GET /admin/api/models`` is what the admin page shows; the POST routes are what its buttons do. A load
answers once the model is loaded (or has failed, with the error in the OpenAI envelope); an unload once the
model's running requests have finished or been cancelled.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from backends import ModelRegistry, RegistryEntry
from backends.placement import PLACEMENT_KEYS, requested_gpu_layers
from proxy.errors import APIError
from proxy.manager import ModelManager, ModelSlot
from proxy.ray_serve import refresh_replicas
from proxy.security import Access, requires
from proxy.settings import total_memory_bytes
from proxy.upstream import UpstreamClients, check_registry, remote_view


def process_rss_bytes() -> int:
    """This process's resident memory, from /proc (Linux); 0 where that is not available."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


REMOTE_NOTE = "served by its upstream server: there is nothing to load or unload here"


def entry_view(
    registry: ModelRegistry, entry: RegistryEntry, slot: ModelSlot | None, remote: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec = entry.spec
    view: dict[str, Any] = {
        "name": entry.name,
        "backend": entry.backend,
        "source": {"registry": entry.source, "index": entry.index},
        "huggingface_id": spec.get("huggingface_id"),
        "file": spec.get("filename") or spec.get("gguf_file"),
        "servable": entry.is_served,
        "shadowed": registry.is_shadowed(entry),  # an earlier entry has the same name and wins
        "errors": [str(p) for p in entry.errors],
        "warnings": [str(p) for p in entry.warnings],
        "placement": {key: spec[key] for key in PLACEMENT_KEYS if key in spec},
        "placement_default_gpu_layers": requested_gpu_layers(spec, gpu_available=True),
    }
    if slot is not None and not view["shadowed"]:
        view.update(slot.describe())
        ray = (view.get("loaded") or {}).get("ray")
        if ray:  # deployed on a Ray cluster: each replica's node, state and requests
            view["replicas"] = ray["replicas"]
    else:
        view.update(state="unloaded" if entry.is_served else "unservable", in_flight=0, queued=0, loaded=None)
    if remote is not None:  # an openai_compatible entry: always there, never loaded
        view.update(state="remote", remote=remote, note=REMOTE_NOTE, loaded=None)
    return view


async def freshen(registry: ModelRegistry, manager: ModelManager, upstreams: UpstreamClients) -> None:
    """What a view shows from elsewhere, looked at again: remote entries' upstreams, Ray Serve replicas."""
    models = [model for name in manager.loaded_names() if (model := manager.loaded(name)) is not None]
    await asyncio.gather(check_registry(registry, upstreams), refresh_replicas(models))


def decode_override(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        override = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(override, dict):
        raise APIError(400, "The request body must be a JSON object of placement keys", code="invalid_body")
    return override


class AdminAPIController(Controller):
    path = "/admin/api"
    opt = requires(Access.ADMIN)

    @get("/models")
    async def list_models(
        self,
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
    ) -> dict[str, Any]:
        await freshen(registry, manager, upstreams)
        models = [
            entry_view(registry, entry, manager.existing_slot(entry.name), remote_view(entry, upstreams))
            for entry in registry
        ]
        return {
            "models": models,
            "loaded": manager.loaded_names(),
            "loaded_bytes": manager.loaded_bytes(),
            "limits": {
                "max_loaded": manager.settings.max_loaded,
                "max_memory": manager.settings.max_memory,
                "max_queue": manager.settings.max_queue,
                "idle_unload": manager.settings.idle_unload,
                "autoload": manager.settings.autoload,
            },
            "process": {"rss_bytes": process_rss_bytes(), "memory_total_bytes": total_memory_bytes()},
            "time": time.time(),
        }

    @get("/models/{name:str}")
    async def get_model(
        self,
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
        name: FromPath[str],
    ) -> dict[str, Any]:
        entry = registry.lookup(name)
        await freshen(registry, manager, upstreams)
        return entry_view(registry, entry, manager.existing_slot(name), remote_view(entry, upstreams))

    @post("/models/{name:str}/load", status_code=200)
    async def load_model(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
        name: FromPath[str],
    ) -> dict[str, Any]:
        """Loads a local model; for a remote entry it does nothing, and the row says so."""
        override = decode_override(await request.body())
        entry = registry.lookup(name)
        remote = remote_view(entry, upstreams)
        slot = manager.slot(name) if remote is not None else await manager.load(name, override)
        return entry_view(registry, entry, slot, remote)

    @post("/models/{name:str}/unload", status_code=200)
    async def unload_model(
        self,
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
        name: FromPath[str],
    ) -> dict[str, Any]:
        entry = registry.lookup(name)
        remote = remote_view(entry, upstreams)
        slot = manager.slot(name) if remote is not None else await manager.unload(name)
        return entry_view(registry, entry, slot, remote)

"""The JSON admin API: every registry entry with its state, load / unload commands, and registry edits.

``GET /admin/api/models`` is what the admin page shows; the POST routes are what its buttons do. A load
answers once the model is loaded (or has failed, with the error in the OpenAI envelope); an unload once the
model's running requests have finished or been cancelled. ``/admin/api/registry`` edits the first registry
file the server was given (``backends.registry.file``), and the server serves the edited entries at once.
``/admin/api/convert-cache`` lists the GGUF checkpoints converted for transformers and clears one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath

from backends import ModelRegistry, RegistryEntry, RegistryFileError
from backends.placement import PLACEMENT_KEYS, requested_gpu_layers
from backends.registry.file import RegistryEditError, RegistryFile
from backends.registry.keys import DESCRIPTIVE_KEYS, unhonoured
from backends.weights.convert_cache import ConversionInUse, ConvertCache
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
        "about": {key: spec[key] for key in DESCRIPTIVE_KEYS if spec.get(key) not in (None, "")},
        "not_honoured": [{"key": key, "what": what} for key, what in unhonoured(spec, entry.backend)],
        "trust_remote_code": bool(spec.get("trust_remote_code")),
        "multimodal": bool(spec.get("multimodal")),
        "adapter": spec.get("peft_model"),
        "placement_default_gpu_layers": requested_gpu_layers(spec, gpu_available=True),
    }
    if slot is not None and not view["shadowed"]:
        view.update(slot.describe())
        # Entries sharing this one's loaded model (variants): a load or unload of one is a load or unload of all.
        view["shares_with"] = sorted(name for name in slot.variants if name != entry.name)
        if entry.name not in slot.variants:  # a variant not asked for yet, over a model another entry loaded
            view["shares_with"] = sorted(slot.variants)
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

    @get("/models/{name:path}")
    async def get_model(
        self,
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
        name: FromPath[str],
    ) -> dict[str, Any]:
        entry = registry.lookup(name.lstrip("/"))
        await freshen(registry, manager, upstreams)
        return entry_view(registry, entry, manager.existing_slot(entry.name), remote_view(entry, upstreams))

    @post("/models/{action:path}", status_code=200)
    async def model_action(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        upstreams: NamedDependency[UpstreamClients],
        action: FromPath[str],
    ) -> dict[str, Any]:
        """``POST /admin/api/models/NAME/load`` (a body of placement keys may override the entry's) and
        ``.../unload``; NAME may hold slashes. Loading answers once the model is loaded; for a remote entry
        neither does anything, and the row says so."""
        name, verb = split_action(action)
        override = decode_override(await request.body()) if verb == "load" else {}
        entry = registry.lookup(name)
        remote = remote_view(entry, upstreams)
        if remote is not None:
            slot = manager.slot(name)
        elif verb == "load":
            slot = await manager.load(name, override)
        else:
            slot = await manager.unload(name)
        return entry_view(registry, entry, slot, remote)

    # --- converted GGUF checkpoints -------------------------------------------------------------------

    @get("/convert-cache")
    async def get_convert_cache(self, convert_cache: NamedDependency[ConvertCache | None]) -> dict[str, Any]:
        return await asyncio.to_thread(convert_cache_view, convert_cache)

    @delete("/convert-cache/{key:str}", status_code=200)
    async def delete_conversion(
        self, convert_cache: NamedDependency[ConvertCache | None], key: FromPath[str]
    ) -> dict[str, Any]:
        await asyncio.to_thread(clear_conversion, convert_cache, key)
        return await asyncio.to_thread(convert_cache_view, convert_cache)

    # --- editing the registry ------------------------------------------------------------------------

    @get("/registry")
    async def get_registry(self, registry_file: NamedDependency[RegistryFile | None]) -> Response[dict[str, Any]]:
        """The file edits go to, its entries as written, and its version (also the ETag)."""
        if registry_file is None:
            return Response({"path": None, "editable": False, "refusal": NO_FILE, "entries": [], "version": None})
        entries, version, _ = registry_file.read()
        refusal = registry_file.refusal()
        body = {
            "path": str(registry_file.path),
            "editable": refusal is None,
            "refusal": refusal,
            "version": version,
            "entries": entries,
        }
        return Response(body, headers={"ETag": f'"{version}"'})

    @put("/registry/entries/{name:path}", status_code=200)
    async def put_entry(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        registry_file: NamedDependency[RegistryFile | None],
        name: FromPath[str],
    ) -> Response[dict[str, Any]]:
        """Add the entry, or replace the entry of that name; ``If-Match`` the version the edit started from."""
        entry = decode_json(await request.body())
        file = editable(registry_file)
        version = await edited(registry, manager, lambda: file.put(name.lstrip("/"), entry, if_match(request)))
        return Response({"version": version, "entry": entry}, headers={"ETag": f'"{version}"'})

    @delete("/registry/entries/{name:path}", status_code=200)
    async def delete_entry(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        manager: NamedDependency[ModelManager],
        registry_file: NamedDependency[RegistryFile | None],
        name: FromPath[str],
    ) -> Response[dict[str, Any]]:
        """Delete the entry; a model loaded for it is unloaded once its running requests have ended."""
        file = editable(registry_file)
        version = await edited(registry, manager, lambda: file.delete(name.lstrip("/"), if_match(request)))
        return Response({"version": version, "deleted": name.lstrip("/")}, headers={"ETag": f'"{version}"'})


NO_FILE = "this server was not started on a registry file (--registry PATH), so there is no file to edit"


def convert_cache_view(cache: ConvertCache | None) -> dict[str, Any]:
    """The conversion cache: where it is, its bound, what it holds (blocking: it reads the folder)."""
    if cache is None:
        return {"enabled": False, "root": None, "max_bytes": 0, "size_bytes": 0, "entries": []}
    entries = [
        {
            "key": c.key,
            "gguf": c.gguf,
            "dtype": c.dtype,
            "transformers": c.transformers,
            "size_bytes": c.size_bytes,
            "last_used": c.last_used,
            "in_use": c.in_use,
        }
        for c in cache.entries()
    ]
    return {
        "enabled": True,
        "root": str(cache.root),
        "max_bytes": cache.max_bytes,
        "size_bytes": sum(e["size_bytes"] for e in entries),
        "entries": entries,
    }


def clear_conversion(cache: ConvertCache | None, key: str) -> None:
    """Remove one cached conversion: 404 for none, 409 for one a loaded model (of any process) uses."""
    try:
        cleared = cache is not None and cache.clear(key)
    except ConversionInUse:
        raise APIError(
            409,
            f"The conversion {key} is used by a loaded model (of this server or another sharing the cache); "
            "unload it first",
            code="conversion_in_use",
        ) from None
    if not cleared:
        raise APIError(404, f"No cached conversion {key}", code="conversion_not_found")


def split_action(action: str) -> tuple[str, str]:
    """``/a/b/load`` -> ``("a/b", "load")``: a model name may hold slashes, so the verb is what ends the path."""
    name, _, verb = action.strip("/").rpartition("/")
    if verb not in ("load", "unload") or not name:
        raise APIError(404, "Not found: no such route or resource")
    return name, verb


def decode_json(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def if_match(request: Request[Any, Any, Any]) -> str | None:
    return request.headers.get("if-match")


def editable(registry_file: RegistryFile | None) -> RegistryFile:
    if registry_file is None:
        raise APIError(409, f"The registry cannot be edited: {NO_FILE}", code="registry_not_editable")
    return registry_file


async def apply_edit(registry: ModelRegistry, manager: ModelManager, edit: Callable[[], str]) -> str:
    """Make one edit of the file (on a thread: it writes and syncs a file), then serve the edited registry;
    ``RegistryEditError`` or ``RegistryFileError`` when it cannot be made."""
    version = await asyncio.to_thread(edit)
    registry.reload()
    await manager.registry_changed()
    return version


async def edited(registry: ModelRegistry, manager: ModelManager, edit: Callable[[], str]) -> str:
    """``apply_edit``, its refusals in the OpenAI envelope."""
    try:
        return await apply_edit(registry, manager, edit)
    except RegistryFileError as exc:  # the file itself is broken: edited by hand into something that is not JSON
        raise APIError(409, str(exc), code="registry_conflict") from None
    except RegistryEditError as exc:
        code = {400: "invalid_model_entry", 404: "model_not_found", 409: "registry_conflict"}[exc.status]
        param = exc.problems[0].key if exc.problems else None
        raise APIError(exc.status, exc.message, param=param, code=code) from None

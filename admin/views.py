"""What the admin page shows, built from the registry and the model manager.

The JSON admin API (``proxy.admin_api``) and this page read the same ``entry_view``; the page adds where the
weights are on disk, a human-readable summary, and the machine's GPU.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from backends import ModelRegistry
from backends.hosts.process import gpus_in_a_process
from backends.weights.convert_cache import ConvertCache
from backends.weights.files import local_copy
from proxy.admin_api import convert_cache_view, entry_view, process_rss_bytes
from proxy.manager import ModelManager
from proxy.upstream import UpstreamClients, remote_view


@functools.lru_cache(maxsize=1)
def gpu_summary() -> dict[str, Any]:
    """Which backend can use a GPU here; asked once, in a process of its own (``backends.hosts.process``), so
    that the server never imports torch or llama.cpp itself."""
    return gpus_in_a_process()


def row_id(name: str) -> str:
    return "m-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def human_bytes(value: int | None) -> str:
    if not value:
        return "–"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{value} B"


def human_age(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, int(now - timestamp))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def gpu_backend(backend: str | None, gpu: dict[str, Any]) -> bool:
    """Whether this entry's backend can put layers on a GPU on this machine."""
    return bool(gpu["backends"].get(backend or "", False))


def placement_asked(view: dict[str, Any]) -> str:
    placement = view["placement"]
    if "execute_on" in placement:
        return f"execute_on: {placement['execute_on']}"
    if "gpu_layers_offloaded" in placement:
        layers = placement["gpu_layers_offloaded"]
        return "gpu_layers_offloaded: all" if layers < 0 else f"gpu_layers_offloaded: {layers}"
    return "default (all layers on a GPU if there is one)"


def placement_done(loaded: dict[str, Any] | None) -> str:
    if not loaded:
        return ""
    parts = [str(loaded.get("device", "?"))]
    if loaded.get("dtype"):
        parts.append(str(loaded["dtype"]))
    if loaded.get("layers_total"):
        parts.append(f"{loaded.get('layers_on_gpu', 0)}/{loaded['layers_total']} layers on GPU")
    parts.append(human_bytes(loaded.get("model_bytes")))
    return " · ".join(parts)


def model_row(registry: ModelRegistry, manager: ModelManager, upstreams: UpstreamClients, name: str) -> dict[str, Any]:
    entry = registry.lookup(name)
    view = entry_view(registry, entry, manager.existing_slot(name), remote_view(entry, upstreams))
    return decorate(view, entry.spec, time.time())


@functools.lru_cache(maxsize=1024)
def _cached_local_copy(key: tuple[tuple[str, str], ...], minute: int) -> Any:
    return local_copy(dict(key))


def decorate(view: dict[str, Any], spec: Any, now: float) -> dict[str, Any]:
    """Add what only the page needs: ids, readable figures, where the weights are."""
    gpu = gpu_summary()
    relevant = ("huggingface_id", "filename", "gguf_file", "python_package", "lookup_source")
    key = tuple((k, str(spec[k])) for k in relevant if k in spec)
    local = view["servable"] and view["state"] != "remote"
    copy = _cached_local_copy(key, int(now // 60)) if local else None  # disks change; look again each minute
    view.update(
        row_id=row_id(view["name"]),
        weights_present=copy.present if copy else None,
        weights_where=copy.where if copy else "",
        weights_size=human_bytes(copy.size_bytes) if copy and copy.present else "",
        asked=placement_asked(view),
        done=placement_done(view.get("loaded")),
        last_used_text=human_age(view.get("last_used"), now),
        gpu_possible=gpu_backend(view["backend"], gpu),
        busy_state=view["state"] in ("loading", "unloading"),
        download_text=download_text(view.get("download")),
        worker_text=worker_text((view.get("loaded") or {}).get("worker")),
        buffers_text=buffers_text(view.get("loaded")),
        charts=charts(view.get("series") or []),
        about_text=about_text(view.get("about") or {}),
        filter_text=filter_text(view),
        **engine_texts(view.get("loaded")),
    )
    return view


def about_text(about: dict[str, Any]) -> str:
    """The entry's descriptive keys, as one line: parameters, context, licence, languages, release date."""
    parts = []
    if about.get("parameters"):
        parts.append(f"{about['parameters']} parameters")
    if about.get("context_size"):
        parts.append(f"{about['context_size']} context")
    licence = about.get("license")
    if isinstance(licence, dict):
        licence = licence.get("name")
    if licence:
        parts.append(str(licence))
    languages = about.get("languages")
    if isinstance(languages, list) and languages:
        parts.append(", ".join(str(language) for language in languages))
    if about.get("release_date"):
        parts.append(f"released {about['release_date']}")
    if about.get("open_weight") is False:
        parts.append("closed weights")
    return " · ".join(parts)


def filter_text(view: dict[str, Any]) -> str:
    """What the filter box matches a row on: names, backend, weights and what the entry says about the model."""
    words = [view["name"], view.get("backend") or "", view.get("huggingface_id") or "", view.get("file") or ""]
    words += [about_text(view.get("about") or {}), *view.get("shares_with", [])]
    return " ".join(words).lower()


CHARTS = (
    ("tokens_per_second", "tokens/s", ""),
    ("ttft_ms", "first token", "ms"),
    ("queued", "queued", ""),
)
CHART_WIDTH, CHART_HEIGHT = 120, 28


def charts(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Small line charts of a loaded model's last minutes, drawn as inline SVG: each point's position, and the
    words its hover shows."""
    if len(series) < 2:
        return []
    start, end = series[0]["time"], series[-1]["time"]
    span = max(end - start, 1e-6)
    drawn = []
    for key, label, unit in CHARTS:
        values = [(p["time"], p[key]) for p in series if p.get(key) is not None]
        if not values:
            continue
        peak = max(v for _, v in values)
        top = peak or 1  # the height a flat zero line is drawn against
        dots = []
        for moment, value in values:
            x = round((moment - start) / span * CHART_WIDTH, 1)
            y = round(CHART_HEIGHT - value / top * CHART_HEIGHT, 1)
            clock = time.strftime("%H:%M:%S", time.localtime(moment))
            dots.append({"x": x, "y": y, "title": f"{clock} · {value:g} {unit or label}".rstrip()})
        drawn.append(
            {
                "key": key,
                "label": label,
                "unit": unit,
                "last": values[-1][1],
                "peak": peak,
                "points": " ".join(f"{d['x']},{d['y']}" for d in dots),
                "dots": dots,
            }
        )
    return drawn


def download_text(download: dict[str, Any] | None) -> str:
    """``45.2 MB of 98.1 MB · 16.0 MB/s · 4 s left``."""
    if not download:
        return ""
    parts = [f"{human_bytes(download['bytes_done'])} of {human_bytes(download['bytes_total'])}"]
    if download.get("bytes_per_second"):
        parts.append(f"{human_bytes(download['bytes_per_second'])}/s")
    if download.get("seconds_left") is not None:
        parts.append(f"{download['seconds_left']:.0f} s left")
    return " · ".join(parts)


def worker_text(worker: dict[str, Any] | None) -> str:
    """A loaded model's worker process: its PID, resident memory, uptime and CPU threads."""
    if not worker:
        return ""
    parts = [f"worker pid {worker['pid']}", f"{human_bytes(worker.get('resident_bytes'))} resident"]
    uptime = worker.get("uptime_s")
    if uptime is not None:
        parts.append(f"up {uptime / 60:.0f} min" if uptime >= 120 else f"up {uptime:.0f} s")
    if worker.get("threads"):
        parts.append(f"{worker['threads']} threads")
    return " · ".join(parts)


def buffers_text(loaded: dict[str, Any] | None) -> str:
    """Where llama.cpp put the weights (CPU_Mapped, CPU_REPACK, AMX...), and whether it repacked them."""
    buffers = (loaded or {}).get("weight_buffers")
    if not buffers:
        return ""
    where = ", ".join(f"{name} {size}" for name, size in buffers.items())
    repack = "repacked" if loaded and loaded.get("repack_weights") else "not repacked"
    return f"weights: {where} ({repack})"


def engine_texts(loaded: dict[str, Any] | None) -> dict[str, str]:
    """A batching engine's slots and prefix cache, in words: what is in use, cached, and reused."""
    if not loaded or not loaded.get("slots"):
        return {}
    cached = loaded.get("slot_cached_tokens") or []
    texts = {
        "slots_text": f"slots {loaded.get('slots_in_use', 0)}/{loaded['slots']} in use · {sum(cached):,} tokens cached"
        f" of {loaded.get('kv_cache_tokens', 0):,} ({human_bytes(loaded.get('kv_cache_bytes'))})",
        "slot_cache_text": ", ".join(f"{n:,}" for n in cached),
    }
    if loaded.get("requests_waiting"):
        texts["slots_text"] += f" · {loaded['requests_waiting']} waiting for a slot"
    rate = loaded.get("prefix_cache_hit_rate")
    if rate is not None:
        texts["cache_text"] = f"prefix cache: {rate:.0%} of prompt tokens reused"
    if loaded.get("mean_batch"):
        batch = f"{loaded['mean_batch']} sequences decoded a step"
        texts["cache_text"] = f"{texts['cache_text']} · {batch}" if "cache_text" in texts else batch
    return texts


def page_context(
    registry: ModelRegistry, manager: ModelManager, upstreams: UpstreamClients, query: str = ""
) -> dict[str, Any]:
    now = time.time()
    shown = []
    for entry in registry:
        view = decorate(
            entry_view(registry, entry, manager.existing_slot(entry.name), remote_view(entry, upstreams)),
            entry.spec,
            now,
        )
        if query and not all(word in view["filter_text"] for word in query.lower().split()):
            continue
        shown.append(view)
    return {"models": shown, "query": query, "summary": summary_context(registry, manager), "total": len(registry)}


def summary_context(registry: ModelRegistry, manager: ModelManager) -> dict[str, Any]:
    gpu = gpu_summary()
    return {
        "loaded": manager.loaded_names(),
        "loaded_bytes": human_bytes(manager.loaded_bytes()),
        "rss": human_bytes(process_rss_bytes()),
        "entries": len(registry),
        "gpu": gpu,
        "gpu_text": ", ".join(gpu["names"]) or ("GPU offload available" if gpu["present"] else "no GPU"),
    }


def conversions_context(cache: ConvertCache | None, error: str | None = None) -> dict[str, Any]:
    """The conversion cache in words, for its section of the page (blocking: it reads the cache's folder)."""
    view = convert_cache_view(cache)
    now = time.time()
    for entry in view["entries"]:
        entry.update(
            gguf_name=entry["gguf"].rsplit("/", 1)[-1],
            size_text=human_bytes(entry["size_bytes"]),
            last_used_text=human_age(entry["last_used"], now),
        )
    view.update(
        size_text=human_bytes(view["size_bytes"]) if view["size_bytes"] else "empty",
        max_text=human_bytes(view["max_bytes"]) if view["max_bytes"] else "",
        error=error,
    )
    return view

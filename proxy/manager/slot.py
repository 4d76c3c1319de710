"""What the manager knows about one registry name: its load state, the loaded model and its requests.

States: ``unloaded -> loading -> loaded -> unloading -> unloaded``, and ``failed`` with its error (the next
load or request tries again). Loads and unloads of one model are serialised by ``transition``; every change
of state or of the request queue is announced on ``changed``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import StrEnum
from typing import Any

from backends import LoadOptions, Model, ModelSpec, backend_of
from proxy.manager.queue import RequestQueue


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class Statistics:
    """A loaded model's recent activity, a point every ``stats_interval``: tokens per second, mean time to first
    token of the requests that ended since the last point, and requests waiting (the last minutes' worth)."""

    POINTS = 60

    def __init__(self) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=self.POINTS)
        self._tokens = 0
        self._first_tokens: list[float] = []
        self._last = time.time()

    def ended(self, tokens: int, first_token: float | None) -> None:
        self._tokens += tokens
        if first_token is not None:
            self._first_tokens.append(first_token)

    def sample(self, now: float, queued: int) -> None:
        seconds = max(now - self._last, 1e-6)
        ttft = sum(self._first_tokens) / len(self._first_tokens) if self._first_tokens else None
        self.points.append(
            {
                "time": round(now, 3),
                "tokens_per_second": round(self._tokens / seconds, 2),
                "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
                "queued": queued,
            }
        )
        self._tokens, self._first_tokens, self._last = 0, [], now


class ModelSlot:
    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        options: LoadOptions,
        max_queue: int,
        concurrency: int | None = None,
        key: str = "",
    ) -> None:
        self.name = name  # the first entry that used it; its variants share it (``variants``)
        self.spec = spec  # what it loads
        self.key = key  # ``backends.registry.variants.load_key``: the entries with this key share this slot
        self.variants: dict[str, ModelSpec] = {name: spec}  # every registry name served by it, with its entry
        self.state = ModelState.UNLOADED
        self.model: Model | None = None
        self.loading: Model | None = None  # the model being loaded, whose progress the admin page shows
        self.error: str | None = None
        self.error_at: float | None = None
        self.failures = 0  # failed loads so far; a request waiting on a load fails with it, later ones retry
        self.crashes: deque[float] = deque()  # when its loaded model died lately (its worker process)
        self.crash_looping = False  # died too often lately: no request loads it again, only a load asked for
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None
        self.last_used: float | None = None
        self.requests_served = 0
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)  # (tokens, seconds) of recent generations
        self.stats = Statistics()
        self.override: dict[str, Any] = {}  # placement keys the current load was given
        self.remote = backend_of(spec).remote  # served by another server: holds no memory, never evicted
        if concurrency is None:
            concurrency = backend_of(spec).concurrency_of(spec, options)
        self.queue = RequestQueue(concurrency, max_queue)
        self.changed = asyncio.Condition()  # notified on every change of state or of the queue
        self.transition = asyncio.Lock()  # held by a load or an unload of this model
        self.pending_load: asyncio.Future[None] | None = None  # a load started on behalf of waiting requests
        self.entry_changed = False  # its registry entry was edited while loaded: a reload applies the edit
        self.entry_deleted = False  # its registry entry was deleted: unloaded once its requests have ended

    @property
    def is_loaded(self) -> bool:
        return self.state == ModelState.LOADED and self.model is not None

    @property
    def model_bytes(self) -> int:
        """The weights in memory."""
        info = self.model.load_info() if self.model is not None else {}
        return int(info.get("model_bytes") or 0)

    @property
    def memory_bytes(self) -> int:
        """What the loaded model holds: weights, and the KV cache of an engine that keeps one; for a model in a
        worker process, what that process really holds when it is more (its resident memory)."""
        info = self.model.load_info() if self.model is not None else {}
        estimate = int(info.get("model_bytes") or 0) + int(info.get("kv_cache_bytes") or 0)
        resident = (info.get("worker") or {}).get("resident_bytes") or 0
        return max(estimate, int(resident))

    async def set_state(self, state: ModelState) -> None:
        async with self.changed:
            self.state = state
            self.changed.notify_all()

    def tokens_per_second(self) -> float | None:
        tokens = sum(t for t, _ in self.recent)
        seconds = sum(s for _, s in self.recent)
        return round(tokens / seconds, 1) if seconds > 0 and tokens else None

    def describe(self) -> dict[str, Any]:
        progress = self.loading.progress.view() if self.loading is not None else {}
        return {
            "state": self.state.value,
            "error": self.error,
            "error_at": self.error_at,
            "crash_looping": self.crash_looping,
            "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds,
            "last_used": self.last_used,
            "in_flight": len(self.queue.running),
            "queued": self.queue.queued,
            "concurrency": self.queue.concurrency,
            "requests_served": self.requests_served,
            "tokens_per_second": self.tokens_per_second(),
            "override": dict(self.override),
            "entry_changed": self.entry_changed,
            "series": list(self.stats.points) if self.is_loaded else [],
            "loaded": self.model.load_info() if self.is_loaded and self.model is not None else None,
            "loading_pid": getattr(self.loading, "pid", None),  # while loading in a worker process: which
            "stage": progress.get("stage"),  # while loading: what the load is doing
            "download": progress.get("download"),  # while it downloads: bytes done and total, speed, time left
        }

"""``ModelManager``: the one owner of every loaded model.

Each registry name has a ``ModelSlot`` with a state (``unloaded``, ``loading``,
``loaded``, ``unloading``, ``failed``). Loads and unloads of one model are
serialised by the slot's ``transition`` lock: two concurrent loads load once,
an unload during a load waits for it, a failed load leaves the model
retryable. Requests take a ``Lease`` on a loaded model: up to the model's
concurrency run at once, the rest wait in FIFO order, and beyond
``max_queue`` waiting ones the server answers 503 with ``Retry-After``
(ollama's scheduler works the same way). Residency is bounded by a model
count and/or a memory budget: a load first unloads the least recently used
idle model, and waits rather than evict one that is serving. Blocking model
work runs on worker threads; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from backends import BackendError, LoadOptions, Model, ModelRegistry, ModelSpec, create_model
from proxy.errors import APIError

logger = logging.getLogger(__name__)

ModelFactory = Callable[[ModelSpec, LoadOptions], Model]

# Registry keys a load request may override, and what each accepts.
PLACEMENT_OVERRIDES: dict[str, Callable[[Any], bool]] = {
    "execute_on": lambda v: v in ("gpu", "cpu"),
    "gpu_layers_offloaded": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
}
# How many generations a model runs at once unless its entry sets ``concurrency``: a llama.cpp context is
# not thread-safe; a transformers model runs independent forward passes side by side.
DEFAULT_CONCURRENCY = {"llamacpp": 1, "huggingface_local": 2}


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True)
class ManagerSettings:
    autoload: bool = True  # load a model on its first request; else an unloaded model answers 503
    max_queue: int = 16  # waiting requests per model beyond the running ones; more get 503
    idle_unload: float = 0.0  # seconds without a request before a model is unloaded; 0: never
    max_loaded: int = 0  # models loaded at once; 0: no bound
    max_memory: int = 0  # bytes of model weights loaded at once; 0: no bound
    unload_timeout: float = 30.0  # how long an unload waits for running requests before cancelling them
    retry_after: int = 2  # seconds, in the Retry-After header of a 503
    request_timeout: float = 0.0  # seconds a request may wait in the queue and generate; 0: no limit


class Lease:
    """One request's hold on a loaded model; ``stop`` ends its generation early with the error its request
    answers with."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._cancels: list[threading.Event] = []
        self._stopped: APIError | None = None
        self.tokens = 0  # generated under this lease, as its request counts them (for tokens per second)

    def cancel_event(self) -> threading.Event:
        """A cancel flag for one generation under this lease (a request with ``n`` > 1 runs several)."""
        event = threading.Event()
        if self._stopped is not None:
            event.set()
        self._cancels.append(event)
        return event

    def stop(self, error: APIError) -> None:
        if self._stopped is not None:
            return  # the first reason stands
        self._stopped = error
        for event in self._cancels:
            event.set()

    def error(self) -> APIError | None:
        """The error its request answers with, once stopped."""
        return self._stopped


class ModelSlot:
    """Everything the manager knows about one registry name."""

    def __init__(self, name: str, spec: ModelSpec) -> None:
        self.name = name
        self.spec = spec
        self.state = ModelState.UNLOADED
        self.model: Model | None = None
        self.error: str | None = None
        self.error_at: float | None = None
        self.failures = 0  # failed loads so far; a request waiting on a load fails with it, later ones retry
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None
        self.last_used: float | None = None
        self.requests_served = 0
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)  # (tokens, seconds) of recent generations
        self.override: dict[str, Any] = {}  # placement keys the current load was given
        self.running: set[Lease] = set()
        self.holds = 0  # short work on the loaded model outside the queue (tokenising a prompt); unload waits
        self.queue: deque[object] = deque()  # FIFO tickets of waiting requests
        self.changed = asyncio.Condition()  # notified on every change of state, running or queue
        self.transition = asyncio.Lock()  # held by a load or an unload of this model
        self.pending_load: asyncio.Future[None] | None = None  # a load started on behalf of waiting requests

    @property
    def concurrency(self) -> int:
        configured = self.spec.get("concurrency")
        if isinstance(configured, int) and configured > 0:
            return configured
        return DEFAULT_CONCURRENCY.get(str(self.spec.get("backend")), 1)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.queue)

    @property
    def model_bytes(self) -> int:
        info = self.model.load_info() if self.model is not None else {}
        return int(info.get("model_bytes") or 0)

    def tokens_per_second(self) -> float | None:
        tokens = sum(t for t, _ in self.recent)
        seconds = sum(s for _, s in self.recent)
        return round(tokens / seconds, 1) if seconds > 0 and tokens else None

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "error": self.error,
            "error_at": self.error_at,
            "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds,
            "last_used": self.last_used,
            "in_flight": len(self.running),
            "queued": len(self.queue),
            "concurrency": self.concurrency,
            "requests_served": self.requests_served,
            "tokens_per_second": self.tokens_per_second(),
            "override": dict(self.override),
            "loaded": self.model.load_info() if self.model is not None and self.state == ModelState.LOADED else None,
        }


def timed_out(timeout: float, waiting: bool) -> APIError:
    """A request past ``--request-timeout``; the same request would only time out again, so the OpenAI SDKs
    are told not to retry it."""
    where = "waiting for its turn on the model" if waiting else "generating"
    return APIError(
        504,
        f"The request was ended after {timeout:g} s {where}: the server's request timeout (--request-timeout)",
        code="request_timeout",
        headers={"x-should-retry": "false"},
    )


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(503, message, code="model_overloaded", headers={"Retry-After": str(retry_after)})


class ModelManager:
    def __init__(
        self,
        registry: ModelRegistry,
        options: LoadOptions,
        factory: ModelFactory = create_model,
        settings: ManagerSettings | None = None,
        metrics: Any = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics  # proxy.metrics.Metrics, when the app keeps metrics
        self.options = options
        self.settings = settings or ManagerSettings()
        self._factory = factory
        self._slots: dict[str, ModelSlot] = {}
        self._residency = asyncio.Condition()  # serialises making room; notified when a model frees up
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()  # referenced until done, so they are not collected

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- views ---------------------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        """The slot of a servable registry name; 404 for an unknown name, 400 for an invalid entry."""
        slot = self._slots.get(name)
        if slot is None:  # the registry never changes: a name resolved once stays resolved
            slot = self._slots[name] = ModelSlot(name, self.registry.resolve(name))
        return slot

    def slots(self) -> list[tuple[str, ModelSlot]]:
        return list(self._slots.items())

    def existing_slot(self, name: str) -> ModelSlot | None:
        return self._slots.get(name)

    def loaded(self, name: str) -> Model | None:
        """The model loaded for a registry name, if any; loads nothing."""
        slot = self._slots.get(name)
        return slot.model if slot is not None and slot.state == ModelState.LOADED else None

    def loaded_names(self) -> list[str]:
        return [name for name, slot in self._slots.items() if slot.state == ModelState.LOADED]

    def loaded_bytes(self) -> int:
        return sum(slot.model_bytes for slot in self._slots.values() if slot.state == ModelState.LOADED)

    # --- requests ------------------------------------------------------------------------------------

    def admit(self, name: str) -> ModelSlot:
        """Refuse now (503) what could not even wait: a full queue, or an unloaded model without autoload."""
        slot = self.slot(name)
        if self._closing:
            raise overloaded("The server is shutting down", self.settings.retry_after)
        if not self.settings.autoload and slot.state in (ModelState.UNLOADED, ModelState.FAILED):
            raise APIError(
                503,
                f"The model '{name}' is not loaded and this server does not load models on demand "
                "(--no-autoload); load it from the admin page or POST /admin/api/models/{name}/load",
                code="model_not_loaded",
                param="model",
                headers={"Retry-After": str(self.settings.retry_after)},
            )
        free = max(0, slot.concurrency - len(slot.running))  # requests that will start as soon as they can
        if len(slot.queue) >= self.settings.max_queue + free:
            raise overloaded(
                f"The model '{name}' is busy: {len(slot.running)} requests running and {len(slot.queue)} waiting "
                f"(the limit is {self.settings.max_queue}); retry later",
                self.settings.retry_after,
            )
        return slot

    @asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[Model]:
        """The loaded model (loading it first when autoload allows), kept loaded while the block runs.

        For short work outside the queue, like tokenising a prompt before the response starts: an unload
        waits for it, so that no thread is still inside a model that is being freed.
        """
        slot = self.admit(name)
        while slot.state != ModelState.LOADED or slot.model is None:  # loaded, or unloaded again meanwhile
            await self._load(slot, None)
        model = slot.model
        slot.holds += 1  # no await since the check above: the unload cannot have started in between
        try:
            yield model
        finally:
            async with slot.changed:
                slot.holds -= 1
                slot.changed.notify_all()

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """Wait for a turn on the model (loading it if need be) and hold it for one generation.

        Admission (the queue bound) is ``admit``'s job, called before the response starts. The request
        timeout counts from here, time in the queue and generating: a load before it (``holding``) does not
        count, so that a big model's first request does not time out while it loads.
        """
        slot = self.slot(name)
        ticket = object()
        failures_seen = slot.failures
        timeout = self.settings.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        async with slot.changed:
            slot.queue.append(ticket)
            slot.changed.notify_all()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait_turn(slot, ticket, failures_seen)
            except BaseException as exc:
                slot.queue.remove(ticket)
                slot.changed.notify_all()
                self._spawn(self._notify_residency())  # the model may be idle now
                if isinstance(exc, TimeoutError):
                    raise timed_out(timeout, waiting=True) from None
                raise
            slot.queue.popleft()
            assert slot.model is not None
            lease = Lease(slot.model)
            slot.running.add(lease)
            slot.last_used = time.time()
            slot.changed.notify_all()
        started = time.monotonic()
        expiry = None
        if deadline is not None:
            expiry = loop.call_at(deadline, lease.stop, timed_out(timeout, waiting=False))
        try:
            yield lease
        finally:
            if expiry is not None:
                expiry.cancel()
            async with slot.changed:
                slot.running.discard(lease)
                slot.last_used = time.time()
                slot.requests_served += 1
                slot.recent.append((lease.tokens, time.monotonic() - started))
                slot.changed.notify_all()
            if self.metrics is not None:
                self.metrics.tokens.labels(name).inc(lease.tokens)
            async with self._residency:
                self._residency.notify_all()

    async def _wait_turn(self, slot: ModelSlot, ticket: object, failures_seen: int) -> None:
        """Wait, holding ``slot.changed``, until the ticket is first in the queue and the model can run it;
        start a load when nobody has."""
        while True:
            if self._closing:
                raise overloaded("The server is shutting down", self.settings.retry_after)
            if slot.queue[0] is ticket:
                if slot.state == ModelState.LOADED and len(slot.running) < slot.concurrency:
                    return
                if slot.state == ModelState.FAILED and slot.failures != failures_seen:
                    raise APIError(500, slot.error or "The model failed to load", code="model_load_failed")
                if slot.state in (ModelState.UNLOADED, ModelState.FAILED) and (
                    slot.pending_load is None or slot.pending_load.done()
                ):
                    if not self.settings.autoload:
                        self.admit(slot.name)  # raises the 503 that explains why
                    failures_seen = slot.failures
                    slot.pending_load = self._spawn(self._load_quietly(slot))
            await slot.changed.wait()

    async def _load_quietly(self, slot: ModelSlot) -> None:
        """A load started for waiting requests; they see its outcome in the slot."""
        try:
            await self._load(slot, None)
        except (BackendError, APIError):
            pass  # recorded in the slot as FAILED, with its message
        except Exception:
            logger.exception("%s: load failed", slot.name)

    # --- load and unload -----------------------------------------------------------------------------

    async def load(self, name: str, override: Mapping[str, Any] | None = None) -> ModelSlot:
        """Load a model (no-op when it is loaded with the same placement); raises the load's error."""
        slot = self.slot(name)
        override = dict(override or {})
        for key, value in override.items():
            check = PLACEMENT_OVERRIDES.get(key)
            if check is None:
                allowed = ", ".join(PLACEMENT_OVERRIDES)
                raise APIError(400, f"'{key}' cannot be set for a load; only {allowed} can", param=key)
            if not check(value):
                raise APIError(400, f"Invalid value {value!r} for '{key}'", param=key, code="invalid_value")
        await self._load(slot, override)
        return slot

    async def _load(self, slot: ModelSlot, override: dict[str, Any] | None) -> None:
        async with slot.transition:
            if slot.state == ModelState.LOADED:
                if override is not None and override != slot.override:
                    raise APIError(
                        409,
                        f"The model '{slot.name}' is loaded with placement {slot.override or 'from its entry'}; "
                        "unload it before loading it with another",
                        code="model_already_loaded",
                    )
                return
            spec = ModelSpec.from_dict({**slot.spec.to_dict(), **override}) if override else slot.spec
            await self._make_room(slot)  # and marks the slot LOADING
            started = time.monotonic()
            model = self._factory(spec, self.options)
            try:
                await asyncio.to_thread(model.load)
            except BaseException as exc:
                message = exc.message if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
                logger.warning("%s: load failed: %s", slot.name, message)
                if self.metrics is not None:
                    self.metrics.load_failures.labels(slot.name).inc()
                async with slot.changed:
                    slot.state = ModelState.FAILED
                    slot.error, slot.error_at = message, time.time()
                    slot.failures += 1
                    slot.changed.notify_all()
                await self._notify_residency()
                raise
            async with slot.changed:
                slot.model = model
                slot.override = dict(override or {})
                slot.state = ModelState.LOADED
                slot.error = slot.error_at = None
                slot.loaded_at, slot.load_seconds = time.time(), round(time.monotonic() - started, 3)
                slot.last_used = slot.last_used or slot.loaded_at
                slot.changed.notify_all()
            logger.info("%s: loaded in %.1f s", slot.name, slot.load_seconds)
            if self.metrics is not None:
                self.metrics.load_seconds.labels(slot.name).observe(slot.load_seconds)
        await self._notify_residency()  # a load waiting for room may now evict this one once it is idle
        await self._evict_over_budget(keep=slot)

    async def unload(self, name: str, timeout: float | None = None) -> ModelSlot:
        """Unload a model once its running requests finish (cancelled after ``timeout``); a failed model is reset."""
        slot = self.slot(name)
        await self._unload(slot, self.settings.unload_timeout if timeout is None else timeout)
        return slot

    async def _unload(self, slot: ModelSlot, timeout: float, *, only_if_idle: bool = False) -> None:
        async with slot.transition:
            if only_if_idle and slot.busy:
                return  # a request came in since the model was picked
            if slot.state == ModelState.FAILED:
                async with slot.changed:
                    slot.state = ModelState.UNLOADED
                    slot.error = slot.error_at = None
                    slot.changed.notify_all()
                return
            if slot.state != ModelState.LOADED:
                return
            await self._set_state(slot, ModelState.UNLOADING)
            await self._finish_or_stop(
                slot, timeout, f"The model '{slot.name}' was unloaded while this request was generating"
            )
            model, slot.model = slot.model, None
            if model is not None:
                await asyncio.to_thread(model.unload)
                del model
                gc.collect()
            async with slot.changed:
                slot.state = ModelState.UNLOADED
                slot.override = {}
                slot.loaded_at = slot.load_seconds = None
                slot.changed.notify_all()
            logger.info("%s: unloaded", slot.name)
        await self._notify_residency()

    async def _set_state(self, slot: ModelSlot, state: ModelState) -> None:
        async with slot.changed:
            slot.state = state
            slot.changed.notify_all()

    async def _notify_residency(self) -> None:
        async with self._residency:
            self._residency.notify_all()

    # --- residency -----------------------------------------------------------------------------------

    def _resident(self, exclude: ModelSlot) -> list[ModelSlot]:
        return [
            s
            for s in self._slots.values()
            if s is not exclude and s.state in (ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING)
        ]

    def _over_budget(self, exclude: ModelSlot, adding: int) -> bool:
        resident = self._resident(exclude)
        if self.settings.max_loaded and len(resident) + adding > self.settings.max_loaded:
            return True
        if self.settings.max_memory:
            used = sum(s.model_bytes for s in resident) + (exclude.model_bytes if not adding else 0)
            return used > self.settings.max_memory
        return False

    def _eviction_candidate(self, exclude: ModelSlot) -> ModelSlot | None:
        idle = [
            s
            for s in self._slots.values()
            if s is not exclude and s.state == ModelState.LOADED and not s.busy and not s.transition.locked()
        ]
        return min(idle, key=lambda s: s.last_used or 0.0, default=None)

    async def _make_room(self, slot: ModelSlot) -> None:
        """Before a load: unload least recently used idle models until one more fits, waiting while all are
        busy; then mark the slot LOADING, so that concurrent loads count it."""
        async with self._residency:
            while self._over_budget(slot, adding=1):
                victim = self._eviction_candidate(slot)
                if victim is None:
                    logger.info("%s: waiting for a loaded model to become idle before loading", slot.name)
                    await self._residency.wait()
                    continue
                logger.info("%s: unloading %s (least recently used) to make room", slot.name, victim.name)
                self._residency.release()
                try:
                    await self._unload(victim, self.settings.unload_timeout, only_if_idle=True)
                finally:
                    await self._residency.acquire()
            await self._set_state(slot, ModelState.LOADING)

    async def _evict_over_budget(self, keep: ModelSlot) -> None:
        """After a load whose size was unknown before: unload idle models while over the memory budget."""
        while self.settings.max_memory and self._over_budget(keep, adding=0):
            victim = self._eviction_candidate(keep)
            if victim is None:
                logger.warning("over --max-memory with every other model busy; nothing unloaded")
                return
            await self._unload(victim, self.settings.unload_timeout, only_if_idle=True)

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model that has served nothing for ``idle_unload`` seconds; returns their names."""
        if not self.settings.idle_unload:
            return []
        now = time.time() if now is None else now
        expired = [
            s
            for s in self._slots.values()
            if s.state == ModelState.LOADED and not s.busy and now - (s.last_used or now) >= self.settings.idle_unload
        ]
        for slot in expired:
            logger.info("%s: idle for %.0f s; unloading", slot.name, now - (slot.last_used or now))
            await self._unload(slot, self.settings.unload_timeout, only_if_idle=True)
        return [s.name for s in expired]

    async def run_idle_unloader(self) -> None:
        """Background task: checks for idle models a few times per ``idle_unload`` period."""
        interval = min(max(self.settings.idle_unload / 4, 0.01), 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.unload_idle()
            except Exception:
                logger.exception("idle unload failed")

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: refuse new requests (503), let running ones finish for up to ``timeout`` seconds,
        then end the rest with a clear error. Queued requests are refused at once."""
        self._closing = True
        for slot in self._slots.values():
            async with slot.changed:
                slot.changed.notify_all()  # queued requests see the server closing
        running = [slot for slot in self._slots.values() if slot.running]
        logger.info("draining: %d models serving, waiting up to %.0f s", len(running), timeout)
        deadline = time.monotonic() + timeout
        for slot in running:
            reason = "The server is shutting down; this request was ended before it finished"
            await self._finish_or_stop(slot, max(0.0, deadline - time.monotonic()), reason, "server_shutting_down")

    async def _finish_or_stop(self, slot: ModelSlot, timeout: float, reason: str, code: str = "model_unloaded") -> None:
        """Wait up to ``timeout`` for the slot's running requests, then stop them with ``reason`` and wait for
        them to end (within a token)."""
        async with slot.changed:
            if not slot.running and not slot.holds:
                return  # also with timeout 0 (shutdown), where wait_for would time out before looking
            try:
                await asyncio.wait_for(slot.changed.wait_for(lambda: not slot.running and not slot.holds), timeout)
            except TimeoutError:
                logger.warning("%s: ending %d running requests: %s", slot.name, len(slot.running), reason)
                for lease in slot.running:
                    lease.stop(APIError(503, reason, code=code))
                await slot.changed.wait_for(lambda: not slot.running and not slot.holds)

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        self._closing = True
        for slot in list(self._slots.values()):
            try:
                await self._unload(slot, timeout=0)
            except Exception:
                logger.exception("%s: unload at shutdown failed", slot.name)

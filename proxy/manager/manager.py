"""``ModelManager``: the one owner of every loaded model.

A request enters it once, through ``reserve``: admitted against the model's bound (``queue``), the model
loaded if need be and held while the request prepares its prompt, then a turn in the model's FIFO
(``Reservation.turn``) and a ``Lease`` for its generations, until the reservation ends. Loads and unloads are
serialised per model (``slot``); which models stay resident is ``residency``'s call. Blocking model work runs
on worker threads; the event loop only awaits. Refusals are ``proxy.manager.errors``, never HTTP errors.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any

from backends import BackendError, LoadOptions, Model, ModelLoadError, ModelRegistry, ModelSpec, backend_of
from backends import create_model as default_factory
from backends.registry.variants import load_key
from proxy.manager.errors import (
    ManagerError,
    ModelNotLoadedError,
    ModelUnloadedError,
    PlacementConflictError,
    RequestTimeoutError,
    ServerShuttingDownError,
)
from proxy.manager.queue import Lease
from proxy.manager.residency import Residency
from proxy.manager.slot import ModelSlot, ModelState
from proxy.settings import ManagerSettings

logger = logging.getLogger(__name__)

# A model whose worker dies this often within the window stays failed until someone loads it on purpose.
CRASH_LIMIT = 3
CRASH_WINDOW_S = 300.0


def only_request_keys_differ(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether two versions of an entry load the same model (an edit of only per-request keys applies at once)."""
    return load_key(old) == load_key(new)


ModelFactory = Callable[[ModelSpec, LoadOptions], Model]
Concurrency = Callable[[ModelSpec, LoadOptions], int]


class Reservation:
    """One request's place with a model, from admission to its end (see ``ModelManager.reserve``).

    Until ``turn()`` the loaded ``model`` is held for preparing the prompt; ``turn()`` waits in the model's
    FIFO and returns the lease the request's generations run under.
    """

    def __init__(self, manager: ModelManager, slot: ModelSlot) -> None:
        self._manager = manager
        self.slot = slot
        self.model: Model | None = None
        self.lease: Lease | None = None
        self.holding = False
        self.ticket: object | None = None  # its place in the FIFO while it waits for its turn
        self.started = 0.0  # when its turn began (time.monotonic())
        self.expiry: asyncio.TimerHandle | None = None

    async def turn(self) -> Lease:
        return await self._manager._turn(self)


class ModelManager:
    def __init__(
        self,
        registry: ModelRegistry,
        options: LoadOptions,
        factory: ModelFactory = default_factory,
        settings: ManagerSettings | None = None,
        metrics: Any = None,
        concurrency: Concurrency | None = None,
    ) -> None:
        """``concurrency``: requests a model runs at once, when the factory's models differ from the backends'
        own (Ray Serve replicas); by default what the entry's backend says."""
        self.registry = registry
        self._concurrency = concurrency
        self.metrics = metrics  # proxy.metrics.Metrics, when the app keeps metrics
        self.options = options
        self.settings = settings or ManagerSettings()
        self._factory = factory
        self._slots: dict[str, ModelSlot] = {}
        self.residency = Residency(
            self.settings.max_loaded, self.settings.max_memory, self.distinct_slots, self._evict_if_idle
        )
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()  # referenced until done, so they are not collected

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Whoever needed the outcome has awaited it; retrieving it here keeps asyncio from reporting it again.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task

    def _announce(self, slot: ModelSlot) -> None:
        """Wake whoever waits on the slot or for room, from code that must not wait itself (a ``finally`` of a
        cancelled request): the state it changed is already consistent, only the notification is deferred."""

        async def notify() -> None:
            async with slot.changed:
                slot.changed.notify_all()
            await self.residency.notify()

        self._spawn(notify())

    # --- views ---------------------------------------------------------------------------------------

    def slot(self, name: str) -> ModelSlot:
        """The slot of a servable registry name; ``UnknownModelError`` or ``InvalidModelEntryError`` otherwise.
        Entries that load the same model (variants: ``backends.registry.variants``) share one slot."""
        slot = self._slots.get(name)
        if slot is not None and slot.entry_deleted:
            self.registry.resolve(name)  # 404: its model serves only the requests it had when it was deleted
        if slot is None:  # a name resolved once stays resolved until its entry is edited (registry_changed)
            spec = self.registry.resolve(name)
            key = load_key(spec, backend_of(spec).remote)
            shared = self._slot_loading(key)
            if shared is not None:
                shared.variants[name] = spec
                slot = self._slots[name] = shared
                logger.info("%s: shares the load of %s (same weights and load keys)", name, shared.name)
                return slot
            concurrency = self._concurrency(spec, self.options) if self._concurrency is not None else None
            slot = self._slots[name] = ModelSlot(
                name, spec, self.options, self.settings.max_queue, concurrency, key=key
            )
        return slot

    def entry_spec(self, name: str) -> ModelSpec:
        """The registry entry a request for ``name`` follows: its own, also where it shares another's load."""
        slot = self.slot(name)
        return slot.variants.get(name, slot.spec)

    def slots(self) -> list[tuple[str, ModelSlot]]:
        """Every name in use with its slot; variants of one model appear once each, with the same slot."""
        return list(self._slots.items())

    def distinct_slots(self) -> list[ModelSlot]:
        """Every slot once, however many names share it."""
        return list({id(slot): slot for slot in self._slots.values()}.values())

    def existing_slot(self, name: str) -> ModelSlot | None:
        """The slot a name uses, or would share (a variant not asked for yet); creates nothing."""
        slot = self._slots.get(name)
        if slot is not None:
            return slot
        try:
            spec = self.registry.resolve(name)
        except BackendError:
            return None
        return self._slot_loading(load_key(spec, backend_of(spec).remote))

    def _slot_loading(self, key: str) -> ModelSlot | None:
        """The slot whose model an entry with this load key shares, if one is in use (and still its entry's)."""
        return next(
            (s for s in self.distinct_slots() if s.key == key and not (s.entry_changed or s.entry_deleted)), None
        )

    def loaded(self, name: str) -> Model | None:
        """The model loaded for a registry name, if any; loads nothing."""
        slot = self._slots.get(name)
        return slot.model if slot is not None and slot.is_loaded else None

    def loaded_names(self) -> list[str]:
        return [name for name, slot in self._slots.items() if slot.is_loaded and not slot.remote]

    def loaded_bytes(self) -> int:
        return sum(slot.model_bytes for slot in self.distinct_slots() if slot.is_loaded)

    # --- requests ------------------------------------------------------------------------------------

    @asynccontextmanager
    async def reserve(self, name: str) -> AsyncIterator[Reservation]:
        """A request's one way in: admit it now or refuse it (503), load the model if need be, and hold it
        loaded while the block prepares the prompt; ``turn()`` then waits for the request's turn.

        Admission is counted before the first ``await``, so a burst of simultaneous requests is bounded by
        the model's concurrency plus ``max_queue``. Everything is released when the block ends, however.
        """
        slot = self.slot(name)
        self._admit(slot)
        reservation = Reservation(self, slot)
        try:
            await self._hold(reservation)
            yield reservation
        finally:
            self._end(reservation)

    def _admit(self, slot: ModelSlot) -> None:
        retry_after = self.settings.retry_after
        if self._closing:
            raise ServerShuttingDownError("The server is shutting down", retry_after=retry_after)
        if not self.settings.autoload and not slot.remote and slot.state in (ModelState.UNLOADED, ModelState.FAILED):
            raise self._not_loaded(slot)
        slot.queue.admit(slot.name, retry_after)

    def _not_loaded(self, slot: ModelSlot) -> ModelNotLoadedError:
        return ModelNotLoadedError(
            f"The model '{slot.name}' is not loaded and this server does not load models on demand "
            f"(--no-autoload); load it from the admin page or POST /admin/api/models/{slot.name}/load",
            retry_after=self.settings.retry_after,
        )

    async def _hold(self, reservation: Reservation) -> None:
        slot = reservation.slot
        while not slot.is_loaded:  # loaded, or unloaded again meanwhile
            # The load runs as a task of its own: a client that leaves does not abandon a half-done load.
            await asyncio.shield(self._load_for_requests(slot))
        slot.queue.holds += 1  # no await since the check: an unload cannot have started in between
        reservation.model, reservation.holding = slot.model, True

    def _load_for_requests(self, slot: ModelSlot) -> asyncio.Future[None]:
        if slot.pending_load is None or slot.pending_load.done():
            slot.pending_load = self._spawn(self._load(slot, None))
        return slot.pending_load

    async def _turn(self, reservation: Reservation) -> Lease:
        """Wait for the reservation's turn, first in line with a free place on the loaded model. The request
        timeout counts from here, waiting and generating; the load before it does not count, so that a big
        model's first request does not time out while it loads."""
        slot, queue = reservation.slot, reservation.slot.queue
        if reservation.holding:
            queue.holds -= 1
            reservation.holding = False
        ticket = reservation.ticket = object()
        failures_seen = slot.failures
        timeout = self.settings.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        async with slot.changed:
            queue.waiting.append(ticket)
            slot.changed.notify_all()  # also for the hold it gave up, which an unload may wait on
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait_turn(slot, ticket, failures_seen)
            except TimeoutError:
                raise RequestTimeoutError(self._timeout_message(timeout, "waiting for its turn on the model")) from None
            assert slot.model is not None
            lease = reservation.lease = queue.start(ticket, slot.model)
            reservation.ticket = None
            slot.last_used = time.time()
            slot.changed.notify_all()
        reservation.started = time.monotonic()
        if deadline is not None:
            timed_out = RequestTimeoutError(self._timeout_message(timeout, "generating"))
            reservation.expiry = loop.call_at(deadline, lease.stop, timed_out)
        return lease

    @staticmethod
    def _timeout_message(timeout: float, where: str) -> str:
        return f"The request was ended after {timeout:g} s {where}: the server's request timeout (--request-timeout)"

    async def _wait_turn(self, slot: ModelSlot, ticket: object, failures_seen: int) -> None:
        """Wait, holding ``slot.changed``, until the ticket may start; start a load when nobody has."""
        while True:
            if self._closing:
                raise ServerShuttingDownError("The server is shutting down", retry_after=self.settings.retry_after)
            if slot.queue.waiting[0] is ticket:
                if slot.is_loaded and slot.queue.can_start(ticket):
                    return
                if slot.state == ModelState.FAILED and (slot.failures != failures_seen or slot.crash_looping):
                    raise ModelLoadError(slot.error or "The model failed to load")
                if slot.state in (ModelState.UNLOADED, ModelState.FAILED):  # unloaded while this one waited
                    if not self.settings.autoload and not slot.remote:
                        raise self._not_loaded(slot)
                    if slot.pending_load is None or slot.pending_load.done():
                        failures_seen = slot.failures
                        self._load_for_requests(slot)
            await slot.changed.wait()

    def _end(self, reservation: Reservation) -> None:
        """Release everything a reservation holds. Synchronous, so that a cancelled request cannot skip it."""
        slot, queue, lease = reservation.slot, reservation.slot.queue, reservation.lease
        if reservation.holding:
            queue.holds -= 1
        if reservation.ticket is not None and reservation.ticket in queue.waiting:
            queue.waiting.remove(reservation.ticket)
        if reservation.expiry is not None:
            reservation.expiry.cancel()
        if lease is not None:
            queue.running.discard(lease)
            slot.last_used = time.time()
            slot.requests_served += 1
            slot.recent.append((lease.tokens, time.monotonic() - reservation.started))
            slot.stats.ended(lease.tokens, lease.first_token)
            if self.metrics is not None:
                self.metrics.tokens.labels(slot.name).inc(lease.tokens)
        queue.admitted -= 1
        self._announce(slot)

    # --- load and unload -----------------------------------------------------------------------------

    async def load(self, name: str, override: Mapping[str, Any] | None = None) -> ModelSlot:
        """Load a model (no-op when it is loaded with the same placement); raises the load's error."""
        slot = self.slot(name)
        override = dict(override or {})
        backend_of(slot.spec).check_placement(override)
        await self._load(slot, override)
        return slot

    async def _load(self, slot: ModelSlot, override: dict[str, Any] | None) -> None:
        """``override`` None: a load on behalf of requests, refused while the model crash-loops; a dict: a load
        asked for (the admin page, the API), which gives a crash-looping model another chance."""
        async with slot.transition:
            if override is None and slot.crash_looping:
                raise ModelLoadError(slot.error or f"The model '{slot.name}' keeps crashing")
            if override is not None:
                slot.crash_looping = False
                slot.crashes.clear()
            if slot.state == ModelState.LOADED:
                if override is not None and override != slot.override:
                    raise PlacementConflictError(
                        f"The model '{slot.name}' is loaded with placement {slot.override or 'from its entry'}; "
                        "unload it before loading it with another"
                    )
                return
            spec = ModelSpec.from_dict({**slot.spec.to_dict(), **override}) if override else slot.spec
            await self.residency.make_room(slot)  # and marks the slot LOADING
            started = time.monotonic()
            model = slot.loading = self._factory(spec, self.options)
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
                await self.residency.notify()
                raise
            finally:
                slot.loading = None
            loop = asyncio.get_running_loop()

            def failed(why: str) -> None:  # from the worker's reader thread
                loop.call_soon_threadsafe(self._model_failed, slot, model, why)

            model.on_failure = failed
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
        await self.residency.notify()  # a load waiting for room may now evict this one once it is idle
        await self.residency.evict_over_budget(keep=slot)

    def _model_failed(self, slot: ModelSlot, model: Model, why: str) -> None:
        """A loaded model broke for good (its worker process died): its requests have had their error already;
        the slot is failed with why, and the next request loads the model afresh, unless it keeps crashing."""
        if slot.model is not model:
            return  # unloaded or replaced meanwhile
        now = time.time()
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > CRASH_WINDOW_S:
            slot.crashes.popleft()
        slot.crash_looping = len(slot.crashes) >= CRASH_LIMIT
        if slot.crash_looping:
            why += (
                f" — it crashed {len(slot.crashes)} times within {CRASH_WINDOW_S / 60:g} minutes, so it stays failed "
                "until it is loaded again from the admin page or POST /admin/api/models/{name}/load"
            ).replace("{name}", slot.name)
        logger.error("%s: %s", slot.name, why)
        if self.metrics is not None:
            self.metrics.load_failures.labels(slot.name).inc()
        slot.model = None
        slot.state = ModelState.FAILED
        slot.error, slot.error_at = why, now
        slot.override = {}
        slot.loaded_at = slot.load_seconds = None
        self._announce(slot)

        async def reap() -> None:
            await asyncio.to_thread(model.unload)  # the process is gone; this collects what is left of it

        self._spawn(reap())

    async def unload(self, name: str, timeout: float | None = None) -> ModelSlot:
        """Unload a model once its running requests finish (stopped after ``timeout``); a failed model is reset,
        a downloading one stops downloading (mid-file); one that reads its weights is unloaded once loaded."""
        slot = self.slot(name)
        if slot.loading is not None and slot.loading.progress.stage == "downloading":
            logger.info("%s: cancelling its download", slot.name)
            slot.loading.progress.cancel()
        await self._unload(slot, self.settings.unload_timeout if timeout is None else timeout)
        return slot

    async def _evict_if_idle(self, slot: ModelSlot) -> None:
        await self._unload(slot, self.settings.unload_timeout, only_if_idle=True)

    async def _unload(self, slot: ModelSlot, timeout: float, *, only_if_idle: bool = False) -> None:
        async with slot.transition:
            if only_if_idle and slot.queue.busy:
                return  # a request came in since the model was picked
            if slot.state == ModelState.FAILED:
                async with slot.changed:
                    slot.state = ModelState.UNLOADED
                    slot.error = slot.error_at = None
                    slot.changed.notify_all()
                return
            if slot.state != ModelState.LOADED:
                return
            await slot.set_state(ModelState.UNLOADING)
            unloaded = ModelUnloadedError(f"The model '{slot.name}' was unloaded while this request was generating")
            await self._finish_or_stop(slot, timeout, unloaded)
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
            if slot.entry_changed:  # its next load reads the edited entry
                self._forget(slot.name, slot)
        await self.residency.notify()

    async def _finish_or_stop(self, slot: ModelSlot, timeout: float, reason: ManagerError) -> None:
        """Wait up to ``timeout`` for the slot's running requests (and prompts being prepared on it), then stop
        them with ``reason`` and wait for them to end (within a token)."""
        queue = slot.queue
        async with slot.changed:
            if not queue.in_use:
                return  # also with timeout 0 (shutdown), where wait_for would time out before looking
            try:
                await asyncio.wait_for(slot.changed.wait_for(lambda: not queue.in_use), timeout)
            except TimeoutError:
                logger.warning("%s: ending %d running requests: %s", slot.name, len(queue.running), reason.message)
                for lease in queue.running:
                    lease.stop(reason)
                await slot.changed.wait_for(lambda: not queue.in_use)

    # --- registry edits ------------------------------------------------------------------------------

    async def registry_changed(self) -> None:
        """After the registry was edited and reloaded: serve each name by its new entry at once where nothing is
        loaded, or where only request-time keys changed; mark a loaded model whose loading keys changed
        (``entry_changed``: a reload applies the edit); unload a deleted entry's model once its requests end.
        A variant sharing its model with other names only leaves it (its next request finds its own)."""
        for name, slot in list(self._slots.items()):
            try:
                spec = self.registry.resolve(name)
            except BackendError:  # deleted, or no longer valid: nothing new may reach it
                spec = None
            old = slot.variants.get(name, slot.spec)
            if spec == old:
                continue
            if spec is not None and only_request_keys_differ(old, spec):
                slot.variants[name] = spec
                if name == slot.name:
                    slot.spec = spec
                    if slot.model is not None:
                        slot.model.spec = ModelSpec.from_dict({**spec.to_dict(), **slot.override})
            elif len(slot.variants) > 1:
                self._detach(name, slot)
            elif not slot.is_loaded and slot.state != ModelState.LOADING:
                self._forget(name, slot)
            elif spec is None:
                slot.entry_deleted = True
                self._spawn(self._unload_deleted(name, slot))
            else:
                slot.entry_changed = True
        await self.residency.notify()

    def _detach(self, name: str, slot: ModelSlot) -> None:
        """A variant's name leaves the model it shared with others, which keeps serving them."""
        slot.variants.pop(name, None)
        if self._slots.get(name) is slot:
            del self._slots[name]
        if name == slot.name and slot.variants:
            slot.name = next(iter(slot.variants))  # its requests, logs and metrics go by a name still in use

    def _forget(self, name: str, slot: ModelSlot) -> None:
        """Drop a slot, so that the name's next use builds one from its current entry."""
        if self._slots.get(name) is slot and not slot.queue.busy:
            for variant in list(slot.variants):
                if self._slots.get(variant) is slot:
                    del self._slots[variant]

    async def _unload_deleted(self, name: str, slot: ModelSlot) -> None:
        await self._unload(slot, self.settings.unload_timeout)
        self._forget(name, slot)

    # --- idle models, shutdown -----------------------------------------------------------------------

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model that has served nothing for ``idle_unload`` seconds; returns their names."""
        idle_unload = self.settings.idle_unload
        if not idle_unload:
            return []
        now = time.time() if now is None else now
        expired = [
            s
            for s in self.distinct_slots()
            if s.state == ModelState.LOADED
            and not s.remote
            and not s.queue.busy
            and now - (s.last_used or now) >= idle_unload
        ]
        for slot in expired:
            logger.info("%s: idle for %.0f s; unloading", slot.name, now - (slot.last_used or now))
            await self._unload(slot, self.settings.unload_timeout, only_if_idle=True)
        return [s.name for s in expired]

    def sample(self, now: float | None = None) -> None:
        """One point of every loaded model's recent statistics (the admin page's charts)."""
        now = time.time() if now is None else now
        for slot in self.distinct_slots():
            if slot.is_loaded:
                slot.stats.sample(now, slot.queue.queued)

    async def run_sampler(self) -> None:
        """Background task: a point of statistics every ``stats_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            self.sample()

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
        for slot in self.distinct_slots():
            async with slot.changed:
                slot.changed.notify_all()  # queued requests see the server closing
        serving = [slot for slot in self.distinct_slots() if slot.queue.running]
        logger.info("draining: %d models serving, waiting up to %.0f s", len(serving), timeout)
        deadline = time.monotonic() + timeout
        for slot in serving:
            reason = ServerShuttingDownError("The server is shutting down; this request was ended before it finished")
            await self._finish_or_stop(slot, max(0.0, deadline - time.monotonic()), reason)

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        self._closing = True
        for slot in self.distinct_slots():
            try:
                await self._unload(slot, timeout=0)
            except Exception:
                logger.exception("%s: unload at shutdown failed", slot.name)

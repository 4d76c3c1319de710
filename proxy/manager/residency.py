"""Which models may sit in memory at once: a model count and/or a memory budget (weights and KV caches).

Before a load, the least recently used idle model is unloaded until one more fits; when every other model
is serving, the load waits for one to become idle rather than cut a request short. After a load whose size
was not known before, idle models are unloaded while the memory budget is exceeded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from proxy.manager.slot import ModelSlot, ModelState

logger = logging.getLogger(__name__)

RESIDENT = (ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING)


class Residency:
    def __init__(
        self,
        max_loaded: int,
        max_memory: int,
        slots: Callable[[], Iterable[ModelSlot]],
        evict: Callable[[ModelSlot], Awaitable[None]],
    ) -> None:
        self.max_loaded = max_loaded  # 0: no bound
        self.max_memory = max_memory  # bytes; 0: no bound
        self._slots = slots
        self._evict = evict  # unloads a model if it is still idle
        self.changed = asyncio.Condition()  # serialises making room; notified when a model may have become idle

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _resident(self, exclude: ModelSlot) -> list[ModelSlot]:
        return [s for s in self._slots() if s is not exclude and s.state in RESIDENT and not s.remote]

    def _over_budget(self, exclude: ModelSlot, adding: int) -> bool:
        resident = self._resident(exclude)
        if self.max_loaded and len(resident) + adding > self.max_loaded:
            return True
        if self.max_memory:
            used = sum(s.memory_bytes for s in resident) + (exclude.memory_bytes if not adding else 0)
            return used > self.max_memory
        return False

    def _eviction_candidate(self, exclude: ModelSlot) -> ModelSlot | None:
        idle = [
            s
            for s in self._slots()
            if s is not exclude
            and s.state == ModelState.LOADED
            and not s.remote
            and not s.queue.busy
            and not s.transition.locked()
        ]
        return min(idle, key=lambda s: s.last_used or 0.0, default=None)

    async def make_room(self, slot: ModelSlot) -> None:
        """Before a load: unload least recently used idle models until one more fits, waiting while all are
        busy; then mark the slot LOADING, so that concurrent loads count it."""
        async with self.changed:
            while not slot.remote and self._over_budget(slot, adding=1):
                victim = self._eviction_candidate(slot)
                if victim is None:
                    logger.info("%s: waiting for a loaded model to become idle before loading", slot.name)
                    await self.changed.wait()
                    continue
                logger.info("%s: unloading %s (least recently used) to make room", slot.name, victim.name)
                self.changed.release()
                try:
                    await self._evict(victim)
                finally:
                    await self.changed.acquire()
            await slot.set_state(ModelState.LOADING)

    async def evict_over_budget(self, keep: ModelSlot) -> None:
        """After a load whose size was unknown before: unload idle models while over the memory budget."""
        while self.max_memory and self._over_budget(keep, adding=0):
            victim = self._eviction_candidate(keep)
            if victim is None:
                logger.warning("over --max-memory with every other model busy; nothing unloaded")
                return
            await self._evict(victim)

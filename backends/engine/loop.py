"""The thread, inbox and request lifecycle both batching engines share; each engine supplies its steps.

Requests come in through ``submit`` and their tokens go out through each request's queue; nothing but the engine
thread touches the engine's cache or samplers. A subclass says how a request takes a slot (``_assign``), what
one step decodes (``_step``) and what a slot lets go of when its request ends (``_release``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any, ClassVar

from backends.engine.slots import UNLOADED, EngineEvent, EngineRequest, EngineStats, Slot
from backends.errors import GenerationError
from backends.model import GenerationOutcome

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle engine sleeps between looks at its inbox


class SlotEngine(ABC):
    library: ClassVar[str]  # "llama.cpp", "transformers": for messages

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.slots = [Slot(seq_id) for seq_id in range(slots)]
        self.stats = EngineStats()
        self.batch_sizes: deque[int] = deque(maxlen=256)  # sequences sampled in each of the last steps
        self._inbox: queue.SimpleQueue[EngineRequest | None] = queue.SimpleQueue()
        self._pending: deque[EngineRequest] = deque()
        self._stopping = False
        self._threads_wanted: int | None = None  # CPU threads to decode with from the next step on
        self._thread = threading.Thread(target=self._run, name=f"{self.library}-engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- from other threads --------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> None:
        if self._stopping or not self._thread.is_alive():
            request.events.put(EngineEvent(finish_reason="cancelled", error=GenerationError(UNLOADED)))
            return
        self._inbox.put(request)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def set_threads(self, threads: int) -> None:
        """Decode with this many CPU threads from the next step on (applied by the engine thread)."""
        self._threads_wanted = threads

    def stop(self) -> None:
        """End every request (with an error event) and stop the thread."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join()

    def slot_stats(self) -> dict[str, Any]:
        """Slots in use and waiting, what each holds in the cache, and how much of the prompts it supplied."""
        slots = list(self.slots)
        prompt_tokens, cached = self.stats.prompt_tokens, self.stats.cached_tokens
        sizes = list(self.batch_sizes)
        return {
            "slots": len(slots),
            "slots_in_use": sum(1 for s in slots if s.busy),
            "requests_waiting": len(self._pending) + self._inbox.qsize(),
            "slot_cached_tokens": [len(s.cached) for s in slots],
            "prefix_cache_hit_rate": round(cached / prompt_tokens, 3) if prompt_tokens else None,
            "prompt_tokens_total": prompt_tokens,
            "cached_tokens_total": cached,
            "requests_total": self.stats.requests,
            "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
        }

    # --- the engine thread ---------------------------------------------------------------------------

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        """What the engine thread runs inside (torch's inference mode, for one)."""
        return contextlib.nullcontext()

    def _run(self) -> None:
        try:
            with self._context():
                while not self._stopping:
                    self._take_inbox(block=not self._active() and not self._pending)
                    self._drop_cancelled()
                    self._assign_pending()
                    if self._threads_wanted is not None:
                        threads, self._threads_wanted = self._threads_wanted, None
                        self._apply_threads(threads)
                    if self._active():
                        self._step()
            reason = GenerationError(UNLOADED)
        except Exception:
            logger.exception("%s: the %s engine failed", self.name, self.library)
            reason = GenerationError(f"The {self.library} engine failed; see the server log")
        finally:
            self._stopping = True
        self._end_all(reason)

    def _active(self) -> list[Slot]:
        return [s for s in self.slots if s.busy]

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                else:
                    self._pending.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _end_all(self, reason: GenerationError) -> None:
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "cancelled", error=reason)
        while self._pending:
            self._pending.popleft().events.put(EngineEvent(finish_reason="cancelled", error=reason))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.events.put(EngineEvent(finish_reason="cancelled", error=reason))

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")
        kept = [r for r in self._pending if not r.cancelled]
        for request in self._pending:
            if request.cancelled:
                request.events.put(EngineEvent(finish_reason="cancelled"))
        self._pending = deque(kept)

    def _assign_pending(self) -> None:
        while self._pending:
            idle = [s for s in self.slots if not s.busy]
            if not idle:
                return
            self._assign(self._pending.popleft(), idle)

    def _finish(self, slot: Slot, reason: str, error: GenerationError | None = None) -> None:
        request = slot.request
        slot.request = None
        slot.last_used = time.monotonic()
        self._release(slot)
        if request is not None:
            request.events.put(EngineEvent(finish_reason=reason, error=error))

    def _took(self, slot: Slot, token: int) -> None:
        """After a sampled token (not the end of sequence) was sent: end the request if its grammar is complete
        ("stop"), or refused the token (an error for this request only), or it has ``max_tokens``."""
        request = slot.request
        assert request is not None
        try:
            ended = request.grammar_ended(token)
        except GenerationError as exc:
            logger.error("%s: %s", self.name, exc.message)
            self._finish(slot, "cancelled", error=exc)
            return
        if ended:
            self._finish(slot, "stop")
        elif slot.generated >= request.max_tokens:
            self._finish(slot, "length")

    def _apply_threads(self, threads: int) -> None:
        """Use this many CPU threads from now on (on the engine thread, between steps)."""
        del threads  # an engine whose library has no thread count to set

    @abstractmethod
    def _assign(self, request: EngineRequest, idle: list[Slot]) -> None:
        """Give the request one of the idle slots, with what the cache holds of its prompt."""

    @abstractmethod
    def _step(self) -> None:
        """Decode one step of the active slots."""

    @abstractmethod
    def _release(self, slot: Slot) -> None:
        """What a slot lets go of when its request ends (its sampler)."""


def engine_tokens(engine: SlotEngine, request: EngineRequest, outcome: GenerationOutcome) -> Generator[int, None, None]:
    """A request's tokens as the engine decodes them, filling in ``outcome``; an error event is raised (unless
    the request was cancelled), and a reader that stops early frees the slot."""
    engine.submit(request)
    try:
        for event in _events(engine, request):
            outcome.cached_tokens = request.cached_tokens
            if event.token is None:  # the end
                if event.error is not None and not request.cancel.is_set():
                    raise event.error
                outcome.finish_reason = "stop" if event.finish_reason == "stop" else "length"
                return
            outcome.completion_tokens += 1
            if event.logprob is not None:
                outcome.logprobs.append(event.logprob)
            yield event.token
            if request.cancel.is_set():  # tokens the engine decoded meanwhile are not the client's any more
                return
    finally:
        request.abandoned.set()


def _events(engine: SlotEngine, request: EngineRequest) -> Iterator[EngineEvent]:
    while True:
        try:
            yield request.events.get(timeout=1.0)
        except queue.Empty:
            if not engine.alive:
                raise RuntimeError(f"{engine.name}: the {engine.library} engine stopped") from None

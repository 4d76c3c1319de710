"""Admission and turns for one model: who may wait, who runs, in which order.

A request is *admitted* once, before anything else happens for it, and counts against the model's bound
from then until it ends: ``concurrency`` requests run at once and at most ``max_queue`` more wait, so a
burst of simultaneous requests can never admit more than ``concurrency + max_queue`` (ollama's scheduler
bounds its queue the same way). An admitted request first prepares its prompt on the loaded model (a
*hold*, which an unload waits for), then takes a place in the FIFO and waits for its turn; its turn is a
``Lease`` on the model for all its generations.

Nothing here loads or unloads: ``ModelManager`` decides when a turn can start; this module only counts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from backends import Model
from proxy.manager.errors import ManagerError, ModelBusyError


class Lease:
    """One request's turn on a loaded model; ``stop`` ends its generations early with the error its request
    answers with."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._cancels: list[threading.Event] = []
        self._on_stop: list[Callable[[], None]] = []
        self._stopped: ManagerError | None = None
        self.tokens = 0  # generated under this lease, as its request counts them (for tokens per second)
        self.first_token: float | None = None  # seconds from its turn to its first text (for the charts)

    def cancel_event(self) -> threading.Event:
        """A cancel flag for one generation under this lease (a request with ``n`` > 1 runs several)."""
        event = threading.Event()
        if self._stopped is not None:
            event.set()
        self._cancels.append(event)
        return event

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) when the lease is stopped, at once if it is already: how work
        that runs on the loop, like a forwarded request, learns that it must end."""
        if self._stopped is not None:
            callback()
        else:
            self._on_stop.append(callback)

    def stop(self, error: ManagerError) -> None:
        if self._stopped is not None:
            return  # the first reason stands
        self._stopped = error
        for event in self._cancels:
            event.set()
        for callback in self._on_stop:
            callback()

    def error(self) -> ManagerError | None:
        """The error its request answers with, once stopped."""
        return self._stopped


class RequestQueue:
    """The admitted requests of one model: counted from admission, FIFO once ready, leased while running.

    Callers hold the model's ``changed`` condition when they change anything, and notify it.
    """

    def __init__(self, concurrency: int, max_queue: int) -> None:
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.admitted = 0  # requests from admission to their end: preparing, waiting or running
        self.holds = 0  # admitted requests preparing on the loaded model; an unload waits for them
        self.waiting: deque[object] = deque()  # tickets of prepared requests, in the order they became ready
        self.running: set[Lease] = set()

    @property
    def queued(self) -> int:
        """Admitted and not yet running: preparing their prompt, or waiting for their turn."""
        return self.admitted - len(self.running)

    @property
    def busy(self) -> bool:
        """Serving or about to: such a model is never evicted or unloaded for being idle."""
        return self.admitted > 0

    @property
    def in_use(self) -> bool:
        """Some thread may be inside the model: an unload must wait for this to end."""
        return bool(self.running or self.holds)

    def admit(self, name: str, retry_after: int) -> None:
        """Count one more request, or refuse it at once when the bound is reached."""
        if self.admitted >= self.concurrency + self.max_queue:
            raise ModelBusyError(
                f"The model '{name}' is busy: {len(self.running)} requests running and {self.queued} waiting "
                f"(the limit is {self.max_queue} waiting); retry later",
                retry_after=retry_after,
            )
        self.admitted += 1

    def can_start(self, ticket: object) -> bool:
        """First in line with a free place: only then does a ready request take its turn."""
        return bool(self.waiting) and self.waiting[0] is ticket and len(self.running) < self.concurrency

    def start(self, ticket: object, model: Model) -> Lease:
        assert self.waiting[0] is ticket
        self.waiting.popleft()
        lease = Lease(model)
        self.running.add(lease)
        return lease

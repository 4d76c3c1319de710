"""Runs a model's blocking generation on a worker thread and hands its text to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator
from typing import Any

from backends import GenerationOutcome, GenerationParams, Model, PreparedPrompt

_DONE = object()


async def generate_text(
    model: Model,
    prompt: PreparedPrompt,
    params: GenerationParams,
    outcome: GenerationOutcome,
    cancel: threading.Event | None = None,
) -> AsyncGenerator[str, None]:
    """Cleaned text deltas as the model produces them.

    Closing it early (client gone, task cancelled) sets the cancel flag, which
    the backend checks after every token, and waits for the worker to stop.
    Callers close it with ``contextlib.aclosing`` inside the model's generation
    slot, so that the slot is free only once the worker is done.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = cancel or threading.Event()  # also set from outside: an unload that cannot wait any longer

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down); nobody is listening
            cancel.set()

    worker: asyncio.Future[None] = loop.create_future()

    def work() -> None:
        try:
            for delta in model.generate(prompt, params, cancel, outcome):
                put(delta)
                if cancel.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            put(_DONE)
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(finished)

    def finished() -> None:
        if not worker.done():
            worker.set_result(None)

    # A thread of its own, not the event loop's executor: a generation holds its thread for as long as it runs,
    # and a few models' concurrent requests would take all of the executor's (cores + 4), leaving none for the
    # short work (tokenising a prompt) that every other request waits for.
    threading.Thread(target=work, name=f"generate-{model.name}", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        await _wait_uncancellable(worker)


async def _wait_uncancellable(worker: asyncio.Future[None]) -> None:
    """Wait for the worker thread even if this task is cancelled meanwhile (a client gone, a server stopping).

    Until it returns the thread may still be inside the model, and whoever holds the model's generation slot
    must not release it before then: a second generation on the same llama.cpp context crashes the process.
    The thread stops within a token once ``cancel`` is set, so this wait is short.
    """
    cancelled = False
    while not worker.done():
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError

"""Runs a model's blocking generation on a worker thread and hands its text to the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from backends import GenerationOutcome, GenerationParams, Model, PreparedPrompt

_DONE = object()


async def generate_text(
    model: Model, prompt: PreparedPrompt, params: GenerationParams, outcome: GenerationOutcome
) -> AsyncIterator[str]:
    """Cleaned text deltas as the model produces them.

    Leaving the loop early (client gone, task cancelled) sets the cancel flag,
    which the backend checks after every token, and waits for the worker to stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down); nobody is listening
            cancel.set()

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

    worker = asyncio.ensure_future(asyncio.to_thread(work))
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
        await asyncio.shield(worker)

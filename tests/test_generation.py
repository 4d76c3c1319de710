"""Handing a model's generation from its worker thread to the event loop, on the real SmolLM2 GGUF.

A request whose client has gone must not let go of the model while its worker thread is still generating:
the next request would start a second generation on the same llama.cpp context, which crashes the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from backends import GenerationOutcome, GenerationParams, LoadOptions, ModelRegistry
from proxy.chat import ChatCompletionService
from proxy.generation import generate_text
from proxy.manager import ModelManager
from proxy.protocol import ChatCompletionRequest, ChatMessage
from tests.support import SMOL, smol_entry

COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


@pytest.fixture
async def manager() -> AsyncIterator[ModelManager]:
    manager = ModelManager(ModelRegistry.from_list([smol_entry()]), LoadOptions())
    try:
        yield manager
    finally:
        await manager.close()


async def test_closed_stream_returns_only_once_the_worker_is_done(manager: ModelManager) -> None:
    service = ChatCompletionService(manager)
    request = ChatCompletionRequest(
        model=SMOL,
        messages=[ChatMessage(role="user", content=COUNTING[0]["content"])],
        temperature=0,
        max_tokens=300,
        stream=True,
    )
    events = await service.stream(request)
    model: Any = manager.loaded(SMOL)
    await anext(events)  # the role chunk
    await anext(events)  # the first content chunk
    await events.aclose()  # what the server does when the client disconnects
    # The worker counts its tokens into the model as its very last step: it must have done so by now.
    assert 1 <= model.tokens_generated < 20


async def test_cancelled_task_returns_only_once_the_worker_is_done(manager: ModelManager) -> None:
    await manager.load(SMOL)
    model: Any = manager.loaded(SMOL)
    params = GenerationParams(max_tokens=300, temperature=0)
    prompt = model.prepare(COUNTING, params)
    outcome = GenerationOutcome()
    first_delta = asyncio.Event()

    async def consume() -> None:
        async with aclosing(generate_text(model, prompt, params, outcome)) as deltas:
            async for _ in deltas:
                first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()  # cancelled again while it waits for the worker (a server shutting down does this)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert model.tokens_generated == outcome.completion_tokens
    assert 1 <= outcome.completion_tokens < 20

"""A burst of simultaneous requests against a real server, on both backends, streamed and not, through the
openai SDK: at most concurrency + ``--max-queue`` are admitted, the rest get 503 with ``Retry-After`` before any
response starts, and every admitted request completes (a stream with one finish_reason, then ``[DONE]``).

Requests sent one after another cannot show this: the bound once held for them, while a burst passed
admission before any of it was queued.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from backends import ModelRegistry
from proxy.settings import Settings
from tests.support import (
    COUNTING,
    SMOL,
    SMOL_HF,
    RunningServer,
    schema_validator,
    smol_entry,
    smol_hf_entry,
    write_registry,
)

MAX_QUEUE = 2
BURST = 12
TOKENS = 32


@pytest.fixture(scope="module")
def burst_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("burst") / "model_registry.json"
    registry = write_registry(path, [smol_entry(), smol_hf_entry(SMOL_HF, smol_checkpoint)])
    with RunningServer(ModelRegistry.from_files([registry]), Settings.of(max_queue=MAX_QUEUE)) as server:
        yield server


async def one_request(client: openai.AsyncOpenAI, model: str, stream: bool) -> Any:
    """The answer (whole, or the stream's SSE lines), or the error the SDK raised for a refusal."""
    body: dict[str, Any] = {"model": model, "messages": COUNTING, "max_tokens": TOKENS, "temperature": 0}
    try:
        if not stream:
            return await client.chat.completions.create(**body)
        async with client.chat.completions.with_streaming_response.create(**body, stream=True) as response:
            return [line async for line in response.iter_lines() if line]
    except openai.APIStatusError as refused:
        return refused


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", [SMOL, SMOL_HF], ids=["llamacpp", "huggingface_local"])
async def test_a_burst_admits_concurrency_plus_max_queue(
    burst_server: RunningServer, openai_schemas: dict[str, Any], model: str, stream: bool
) -> None:
    concurrency = burst_server.services.manager.slot(model).queue.concurrency  # llama.cpp's slots, or 2
    assert concurrency + MAX_QUEUE < BURST
    client = openai.AsyncOpenAI(base_url=f"{burst_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    outcomes = await asyncio.gather(*(one_request(client, model, stream) for _ in range(BURST)))
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    admitted = [o for o in outcomes if not isinstance(o, openai.APIStatusError)]
    assert len(admitted) == concurrency + MAX_QUEUE and len(refused) == BURST - len(admitted)
    error_shape = schema_validator(openai_schemas, "ErrorResponse")
    for error in refused:
        assert error.status_code == 503 and error.code == "model_overloaded"
        assert int(error.response.headers["retry-after"]) > 0
        error_shape.validate(error.response.json())
    chunk_shape = schema_validator(openai_schemas, "CreateChatCompletionStreamResponse")
    for answer in admitted:
        if not stream:
            assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == TOKENS
            continue
        assert answer[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in answer[:-1]]
        for event in events:
            chunk_shape.validate(event)
        finishing = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
        assert [e["choices"][0]["finish_reason"] for e in finishing] == ["length"]
    assert burst_server.services.manager.slot(model).queue.admitted == 0  # every place was given back
    await client.close()

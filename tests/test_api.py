"""The OpenAI chat API over a real server, with the real openai SDK, on the real SmolLM2 model, on both
backends (the ``variants`` fixture)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.support import (
    COLORS,
    COUNTING,
    SMOL,
    SMOL_HF_GGUF,
    RunningServer,
    Variants,
    complete,
    schema_validator,
    stream_chunks,
    streamed_text,
    wait_until,
)


def test_non_stream_answers_with_real_usage(
    openai_client: Any, openai_schemas: dict[str, Any], variants: Variants
) -> None:
    response = complete(openai_client, variants.plain)
    schema_validator(openai_schemas, "CreateChatCompletionResponse").validate(response.model_dump(exclude_unset=True))
    assert response.id.startswith("chatcmpl-")
    assert response.model == variants.plain
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert "Red" in choice.message.content or "red" in choice.message.content
    assert "<|im_end|>" not in choice.message.content
    assert choice.finish_reason == "stop"
    assert response.usage.prompt_tokens > 20
    assert 0 < response.usage.completion_tokens <= 40
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


@pytest.mark.parametrize("variant", ["plain", "custom_template", "cull_green", "split"])
def test_stream_equals_non_stream(openai_client: Any, variants: Variants, variant: str) -> None:
    model = getattr(variants, variant)
    whole = complete(openai_client, model).choices[0].message.content
    chunks = stream_chunks(openai_client, model)
    assert streamed_text(chunks) == whole
    assert whole  # something was generated and survived cleaning


def test_stream_shape(openai_client: Any, openai_schemas: dict[str, Any], variants: Variants) -> None:
    chunks = stream_chunks(openai_client, variants.plain, stream_options={"include_usage": True})
    validator = schema_validator(openai_schemas, "CreateChatCompletionStreamResponse")
    for chunk in chunks:
        validator.validate(chunk.model_dump(exclude_unset=True))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens > 0


def test_raw_stream_ends_with_done_and_has_no_event_lines(
    api_server: RunningServer, openai_schemas: dict[str, Any]
) -> None:
    body = {"model": SMOL, "messages": COLORS, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{api_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    validator = schema_validator(openai_schemas, "CreateChatCompletionStreamResponse")
    for line in lines[:-1]:
        validator.validate(json.loads(line[6:]))


def test_max_tokens_gives_length(openai_client: Any, variants: Variants) -> None:
    response = complete(openai_client, variants.plain, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3
    chunks = stream_chunks(openai_client, variants.plain, max_tokens=3)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_max_completion_tokens_is_honoured(openai_client: Any) -> None:
    response = complete(openai_client, max_tokens=None, max_completion_tokens=2)
    assert response.usage.completion_tokens == 2


def test_stop_string_cuts_output(openai_client: Any, variants: Variants) -> None:
    full = complete(openai_client, variants.plain).choices[0].message.content
    assert "Blue" in full
    cut = complete(openai_client, variants.plain, stop=["Blue"])
    assert cut.choices[0].message.content == full.split("Blue")[0]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed_text(stream_chunks(openai_client, variants.plain, stop=["Blue"])) == full.split("Blue")[0]


def test_eos_to_cull_and_output_split_prefix(openai_client: Any, variants: Variants) -> None:
    plain = complete(openai_client, variants.plain).choices[0].message.content
    assert plain == "1. Red\n2. Blue\n3. Green"  # SmolLM2's greedy answer, which the next two entries clean
    assert complete(openai_client, variants.cull_green).choices[0].message.content == "1. Red\n2. Blue\n3. "
    assert complete(openai_client, variants.split).choices[0].message.content == "Blue\n3. Green"


def test_custom_chat_template_is_used(openai_client: Any, variants: Variants) -> None:
    # SmolLM2's own template adds a default system prompt when there is none; the custom ChatML one does not.
    assert (
        complete(openai_client, variants.custom_template).usage.prompt_tokens
        < complete(openai_client, variants.plain).usage.prompt_tokens
    )
    # With a system message both render the same ChatML, so the same prompt and the same greedy answer.
    messages = [{"role": "system", "content": "You answer in lists."}, *COLORS]
    custom = complete(openai_client, variants.custom_template, messages=messages)
    premade = complete(openai_client, variants.plain, messages=messages)
    assert custom.usage.prompt_tokens == premade.usage.prompt_tokens
    assert custom.choices[0].message.content == premade.choices[0].message.content


def test_same_seed_same_sample(openai_client: Any, variants: Variants) -> None:
    first = complete(openai_client, variants.plain, temperature=1.0, seed=1234).choices[0].message.content
    second = complete(openai_client, variants.plain, temperature=1.0, seed=1234).choices[0].message.content
    assert first == second


def test_text_content_parts_are_joined(openai_client: Any) -> None:
    parts = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]
    response = complete(openai_client, messages=[{"role": "user", "content": parts}])
    assert response.choices[0].message.content == complete(openai_client).choices[0].message.content


def test_models_lists_servable_entries(openai_client: Any, openai_schemas: dict[str, Any]) -> None:
    models = openai_client.models.list()
    schema_validator(openai_schemas, "ListModelsResponse").validate(
        {"object": "list", "data": [m.model_dump() for m in models.data]}
    )
    names = [m.id for m in models.data]
    assert names[0] == SMOL
    assert "broken-entry" not in names
    assert openai_client.models.retrieve(SMOL).id == SMOL
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_health_reports_loaded_models(api_server: RunningServer, openai_client: Any) -> None:
    complete(openai_client, max_tokens=1)
    health = httpx.get(f"{api_server.base_url}/health").json()
    assert health["status"] == "ok"
    assert SMOL in health["loaded"]


def test_disconnect_stops_generation(api_server: RunningServer, openai_client: Any, variants: Variants) -> None:
    complete(openai_client, variants.plain, max_tokens=1)  # loaded before we start counting
    model = api_server.services.manager.loaded(variants.plain)
    before = model.tokens_generated
    body = {"model": variants.plain, "messages": COUNTING, "temperature": 0, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{api_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        content_chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                content_chunks += 1
            if content_chunks == 3:
                break  # leaving the block closes the connection mid-stream
    slot = api_server.services.manager.slot(variants.plain)
    wait_until(lambda: slot.queue.admitted == 0, "the abandoned request has ended")
    abandoned = model.tokens_generated - before
    assert 3 <= abandoned <= 3 + 8, f"generation went on for {abandoned} tokens after the client left"


def test_gguf_through_transformers_answers(openai_client: Any) -> None:
    response = complete(openai_client, SMOL_HF_GGUF)
    assert response.choices[0].message.content == "1. Red\n2. Blue\n3. Green"
    assert response.choices[0].finish_reason == "stop"


def test_model_without_a_chat_template_gets_the_generic_one(
    api_server: RunningServer, openai_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    response = complete(openai_client, "smol-hf-no-template")
    assert response.choices[0].message.content.strip()  # a usable prompt gets some answer
    model = api_server.services.manager.loaded("smol-hf-no-template")
    info = model.load_info()
    assert info["chat_template"] == "generic"
    assert any("ships no chat template" in w and "generic fallback" in w for w in info["warnings"])
    prompt = model.render_prompt(COLORS)
    assert prompt.endswith("User: Name three colors.\n\nAssistant:")


def test_penalties_change_the_greedy_answer(openai_client: Any, variants: Variants) -> None:
    plain = complete(openai_client, variants.plain, messages=COUNTING, max_tokens=30).choices[0].message.content
    penalised = complete(openai_client, variants.plain, messages=COUNTING, max_tokens=30, frequency_penalty=1.5)
    assert penalised.choices[0].message.content != plain  # repeating ", " costs more with every number
    streamed = stream_chunks(openai_client, variants.plain, messages=COUNTING, max_tokens=30, frequency_penalty=1.5)
    assert streamed_text(streamed) == penalised.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        complete(openai_client, variants.plain, presence_penalty=2.5)
    assert caught.value.body["param"] == "presence_penalty"


def test_several_choices_streamed_and_not(
    openai_client: Any, openai_schemas: dict[str, Any], variants: Variants
) -> None:
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 12, "n": 3}
    response = complete(openai_client, variants.plain, **sampled)
    schema_validator(openai_schemas, "CreateChatCompletionResponse").validate(response.model_dump(exclude_unset=True))
    assert [c.index for c in response.choices] == [0, 1, 2]
    texts = [c.message.content for c in response.choices]
    assert len(set(texts)) > 1  # seed + index per choice: different samples ...
    assert [
        c.message.content for c in complete(openai_client, variants.plain, **sampled).choices
    ] == texts  # ... reproducible
    # The prompt counts once, the completions add up.
    assert response.usage.prompt_tokens == complete(openai_client, variants.plain, max_tokens=12).usage.prompt_tokens
    assert 3 <= response.usage.completion_tokens <= 3 * 12

    chunks = stream_chunks(openai_client, variants.plain, stream_options={"include_usage": True}, **sampled)
    validator = schema_validator(openai_schemas, "CreateChatCompletionStreamResponse")
    for chunk in chunks:
        validator.validate(chunk.model_dump(exclude_unset=True))
    for index, text in enumerate(texts):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == [response.choices[index].finish_reason]
        assert "".join(c.delta.content or "" for c in mine) == text
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_logprobs_streamed_and_not(openai_client: Any, openai_schemas: dict[str, Any], variants: Variants) -> None:
    response = complete(openai_client, variants.plain, logprobs=True, top_logprobs=3)
    schema_validator(openai_schemas, "CreateChatCompletionResponse").validate(response.model_dump(exclude_unset=True))
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content == "1. Red\n2. Blue\n3. Green"
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode() == entry.token
    chunks = stream_chunks(openai_client, variants.plain, logprobs=True, top_logprobs=3)
    validator = schema_validator(openai_schemas, "CreateChatCompletionStreamResponse")
    for chunk in chunks:
        validator.validate(chunk.model_dump(exclude_unset=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    assert complete(openai_client, variants.plain).choices[0].logprobs is None  # not asked, not sent
    with pytest.raises(openai.BadRequestError) as caught:
        complete(openai_client, variants.plain, top_logprobs=2)
    assert caught.value.body["param"] == "top_logprobs"


async def test_async_client_and_the_stream_helper(api_server: RunningServer, variants: Variants) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    whole = await client.chat.completions.create(model=variants.plain, messages=COLORS, temperature=0, max_tokens=40)
    async with client.chat.completions.stream(
        model=variants.plain, messages=COLORS, temperature=0, max_tokens=40
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == whole.choices[0].message.content == "1. Red\n2. Blue\n3. Green"
    assert final.choices[0].finish_reason == "stop"
    await client.close()


def test_stream_helper_of_the_sync_client(openai_client: Any, variants: Variants) -> None:
    with openai_client.chat.completions.stream(
        model=variants.plain, messages=COLORS, temperature=0, max_tokens=40
    ) as stream:
        text = "".join(event.delta for event in stream if event.type == "content.delta")
    assert text == "1. Red\n2. Blue\n3. Green"


def test_chat_template_kwargs_reach_the_template(openai_client: Any, variants: Variants) -> None:
    plain = complete(openai_client, variants.custom_template, max_tokens=40)
    prefixed = complete(
        openai_client,
        variants.custom_template,
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"answer_prefix": "1. Red\n2."}},
    )
    assert prefixed.usage.prompt_tokens > plain.usage.prompt_tokens
    assert prefixed.choices[0].message.content.startswith(" Blue")  # the model goes on from the prefix


def test_the_client_checks_every_body_against_the_schemas(openai_client: Any) -> None:
    checked = openai_client._client._transport.checked
    before = dict(checked)
    complete(openai_client, max_tokens=2)
    stream_chunks(openai_client, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        complete(openai_client, "no-such-model")
    assert checked["CreateChatCompletionResponse"] == before.get("CreateChatCompletionResponse", 0) + 1
    assert checked["CreateChatCompletionStreamResponse"] >= before.get("CreateChatCompletionStreamResponse", 0) + 3
    assert checked["ErrorResponse"] == before.get("ErrorResponse", 0) + 1

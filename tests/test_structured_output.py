"""Structured output and tool calling over the real server, on both backends, with the openai SDK: the real
135M model writes, and the grammar, not the model, guarantees the shape. Every body and stream event is checked
against OpenAI's schemas by the client's transport."""

from __future__ import annotations

import json
import threading
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.support import TIME_TOOL, WEATHER_TOOL, RunningServer, Variants

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["player", "judge", "host"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "maxLength": 5}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "age", "height_m", "role", "address", "scores"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
PERSON_PROMPT = [{"role": "user", "content": "Describe a person who plays a word game, as JSON."}]

TOOLS = [WEATHER_TOOL, TIME_TOOL]
TOOL_PROMPT = [{"role": "user", "content": "What is the weather in Paris right now?"}]
BAD_PARAMETERS = {"type": "object", "properties": {"a": {"type": "string", "format": "nope"}}}
CALL = {"name": "get_weather", "arguments": "{}"}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=16)
    country: Literal["France", "Germany", "Italy"]


class Player(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    address: Address


def assert_valid_calls(calls: Any, names: set[str]) -> None:
    assert calls, "expected tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed_message(stream: Any) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """A stream's content, its tool calls reassembled from their deltas (by index), and its finish reason."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                if piece.id:
                    assert call["id"] is None, "a call's id comes once, in its first chunk"
                    call["id"] = piece.id
                    assert piece.type == "function"
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parse_returns_a_pydantic_object(openai_client: Any, variants: Variants, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": variants.plain,
        "messages": [{"role": "user", "content": "Make up a player of a word game."}],
        "response_format": Player,
        "temperature": 0,
        "max_tokens": 80,
    }
    if stream:
        with openai_client.chat.completions.stream(**request) as events:
            completion = events.get_final_completion()
    else:
        completion = openai_client.chat.completions.parse(**request)
    player = completion.choices[0].message.parsed
    assert isinstance(player, Player) and isinstance(player.address, Address)
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_strict_schema_validates_at_temperature_one(openai_client: Any, variants: Variants, stream: bool) -> None:
    for seed in range(3):
        request = dict(
            model=variants.plain,
            messages=PERSON_PROMPT,
            response_format=PERSON_FORMAT,
            temperature=1.0,
            seed=seed,
            max_tokens=150,
        )
        if stream:
            content, calls, finish = streamed_message(openai_client.chat.completions.create(stream=True, **request))
            assert not calls
        else:
            answer = openai_client.chat.completions.create(**request).choices[0]
            content, finish = answer.message.content, answer.finish_reason
        assert finish == "stop", content
        jsonschema.validate(json.loads(content or ""), PERSON_SCHEMA)


def test_json_object_and_a_short_budget(openai_client: Any, variants: Variants) -> None:
    answer = openai_client.chat.completions.create(
        model=variants.plain,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        temperature=0.7,
        seed=1,
        max_tokens=120,
    ).choices[0]
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.message.content), dict)
    cut = openai_client.chat.completions.create(
        model=variants.plain, messages=PERSON_PROMPT, response_format=PERSON_FORMAT, temperature=0, max_tokens=5
    ).choices[0]
    assert cut.finish_reason == "length"  # OpenAI's: the budget ran out inside the JSON
    assert cut.message.content.startswith("{")
    text = openai_client.chat.completions.create(
        model=variants.plain, messages=PERSON_PROMPT, response_format={"type": "text"}, temperature=0, max_tokens=5
    ).choices[0]
    assert text.message.content and not text.message.content.startswith("{")  # as without response_format


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_tool_choices_give_valid_calls(openai_client: Any, variants: Variants, stream: bool) -> None:
    choices: list[Any] = ["required", {"type": "function", "function": {"name": "get_time"}}]
    for tool_choice, names in zip(choices, [{"get_weather", "get_time"}, {"get_time"}], strict=True):
        for seed in range(2):
            request = dict(
                model=variants.plain,
                messages=TOOL_PROMPT,
                tools=TOOLS,
                tool_choice=tool_choice,
                parallel_tool_calls=False,
                temperature=1.0,
                seed=seed,
                max_tokens=100,
            )
            if stream:
                content, streamed, finish = streamed_message(
                    openai_client.chat.completions.create(stream=True, **request)
                )
                calls = [
                    openai.types.chat.ChatCompletionMessageFunctionToolCall(
                        id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}
                    )
                    for c in streamed
                ]
            else:
                answer = openai_client.chat.completions.create(**request).choices[0]
                content, calls, finish = answer.message.content, answer.message.tool_calls, answer.finish_reason
            assert finish == "tool_calls" and content is None
            assert len(calls) == 1  # parallel_tool_calls false: one call
            assert_valid_calls(calls, names)


def test_auto_answers_or_calls_and_none_never_calls(openai_client: Any, variants: Variants) -> None:
    for seed in range(3):
        answer = openai_client.chat.completions.create(
            model=variants.plain, messages=TOOL_PROMPT, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=80
        ).choices[0]
        if answer.message.tool_calls:
            assert_valid_calls(answer.message.tool_calls, set(PARAMETERS))
            assert answer.finish_reason in ("tool_calls", "length")
        else:
            assert answer.message.content
        never = openai_client.chat.completions.create(
            model=variants.plain,
            messages=TOOL_PROMPT,
            tools=TOOLS,
            tool_choice="none",
            temperature=1.0,
            seed=seed,
            max_tokens=30,
        ).choices[0]
        assert never.message.tool_calls is None and never.finish_reason != "tool_calls"


def test_streamed_call_reassembles_into_the_whole_answers_call(openai_client: Any, variants: Variants) -> None:
    request = dict(
        model=variants.plain,
        messages=TOOL_PROMPT,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    whole = openai_client.chat.completions.create(**request).choices[0]
    content, streamed, finish = streamed_message(openai_client.chat.completions.create(stream=True, **request))
    assert finish == whole.finish_reason == "tool_calls" and content is None
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in streamed)


def test_a_tool_result_round_trip_answers(openai_client: Any, variants: Variants) -> None:
    call = openai_client.chat.completions.create(
        model=variants.plain, messages=TOOL_PROMPT, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80
    ).choices[0]
    history = [
        *TOOL_PROMPT,
        call.message.model_dump(exclude_none=True),
        *[
            {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}
            for c in call.message.tool_calls
        ],
    ]
    answer = openai_client.chat.completions.create(
        model=variants.plain, messages=history, tools=TOOLS, temperature=0, max_tokens=30
    ).choices[0]
    assert answer.message.content or answer.message.tool_calls
    # Greedy, so the test never rests on a sampled first token (a sampled end of turn left it empty once in CI).
    plain = {"model": variants.plain, "messages": history, "tools": TOOLS, "tool_choice": "none"}
    plain |= {"temperature": 0, "max_tokens": 10}
    whole = openai_client.chat.completions.create(**plain).choices[0]
    content, calls, finish = streamed_message(openai_client.chat.completions.create(**plain, stream=True))
    assert content and content == whole.message.content and calls == [] and not whole.message.tool_calls
    assert finish == whole.finish_reason


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"response_format": {**PERSON_FORMAT, "json_schema": {"name": "p", "schema": {"type": "strin"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/nowhere"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_PARAMETERS}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [*TOOL_PROMPT, {"role": "assistant", "content": "x", "tool_calls": False}]},
         "messages[1].tool_calls"),
        ({"messages": [*TOOL_PROMPT, {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [*TOOL_PROMPT, {"role": "tool", "content": "21 degrees"}]}, "messages[1].tool_call_id"),
        ({"messages": [*TOOL_PROMPT, {"role": "tool", "content": "21", "tool_call_id": "never-made"}]},
         "messages[1].tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": CALL}]}]},
         "messages[0].tool_calls"),
    ],
    ids=[
        "bad-type", "dangling-ref", "unknown-format-type", "bad-parameters", "bad-function-name", "unknown-named",
        "choice-without-tools", "unknown-choice", "tool-calls-false", "call-without-arguments", "tool-without-id",
        "tool-answers-nothing", "user-with-calls",
    ],
)  # fmt: skip
def test_bad_schemas_and_tool_messages_get_a_400_naming_the_field(
    api_server: RunningServer, variants: Variants, change: dict[str, Any], param: str
) -> None:
    body = {"model": variants.plain, "messages": TOOL_PROMPT, "max_tokens": 5, **change}
    response = httpx.post(f"{api_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{api_server.base_url}/health", timeout=10).status_code == 200


def test_constrained_and_free_requests_decoded_together(openai_client: Any, variants: Variants) -> None:
    free = dict(model=variants.plain, messages=PERSON_PROMPT, temperature=0, max_tokens=40)
    constrained = dict(free, response_format=PERSON_FORMAT, max_tokens=150)
    alone = [openai_client.chat.completions.create(**r).choices[0] for r in (free, constrained)]
    results: dict[int, Any] = {}

    def run(index: int, request: dict[str, Any]) -> None:
        results[index] = openai_client.chat.completions.create(**request).choices[0]

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate([free, constrained, free, constrained])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, answer in results.items():
        if index % 2:  # constrained: valid, and complete
            assert answer.finish_reason == "stop"
            jsonschema.validate(json.loads(answer.message.content), PERSON_SCHEMA)
        else:  # free: the grammar of the other sequence in the batch did not touch it
            assert answer.finish_reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(answer.message.content)
        if variants.backend == "huggingface_local":  # its batched greedy decode is exactly the decode alone
            assert answer.message.content == alone[index % 2].message.content

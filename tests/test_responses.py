"""The Responses API over the real server, on both backends, with the openai SDK as the client: whole and
streamed answers, the SDK's stream helper, conversations continued by ``previous_response_id`` (and found
again in the engine's prefix cache), function tools, structured output, stored responses and who may read
them. Every body and stream event is checked against OpenAI's ``Response`` and ``ResponseStreamEvent``
schemas by the client's transport."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from backends import ModelRegistry
from proxy.responses.store import ResponseStore, StoredResponse
from proxy.settings import AccessSettings, ManagerSettings, Settings, StorageSettings
from tests.support import (
    HF_VARIANTS,
    LLAMACPP_VARIANTS,
    TIME_TOOL,
    WEATHER_TOOL,
    RunningServer,
    SchemaCheckingTransport,
    StreamInThread,
    Variants,
    free_port,
    smol_entry,
    smol_hf_entry,
    wait_until,
    write_registry,
)

KEY, OTHER_KEY = "key-of-alice", "key-of-bob"
QUESTION = "Name three colors."

# The chat tools in the Responses API's flat shape: {"type": "function", "name": ..., "parameters": ...}.
WEATHER, TIME = ({"type": "function", **tool["function"]} for tool in (WEATHER_TOOL, TIME_TOOL))
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["name"]: tool["parameters"] for tool in TOOLS}
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["player", "judge", "host"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "scores"],
    "additionalProperties": False,
}


class Player(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)


@pytest.fixture(scope="module")
def responses_server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    """Both backends behind two API keys, the stored responses in a database file of their own."""
    root = tmp_path_factory.mktemp("responses")
    entries = [
        smol_entry(LLAMACPP_VARIANTS.plain),
        smol_entry(LLAMACPP_VARIANTS.small_context, context_size=128),
        smol_hf_entry(HF_VARIANTS.plain, smol_checkpoint),
        smol_hf_entry(HF_VARIANTS.small_context, smol_checkpoint, context_size=128),
    ]
    settings = Settings(
        access=AccessSettings(api_key=(KEY, OTHER_KEY)), storage=StorageSettings(data_dir=str(root / "data"))
    )
    with RunningServer(
        ModelRegistry.from_files([write_registry(root / "model_registry.json", entries)]), settings
    ) as server:
        yield server


def sdk(server: RunningServer, schemas: dict[str, Any], key: str = KEY) -> openai.OpenAI:
    http_client = httpx.Client(transport=SchemaCheckingTransport(schemas), timeout=120)
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, http_client=http_client)


@pytest.fixture(scope="module")
def client(responses_server: RunningServer, openai_schemas: dict[str, Any]) -> openai.OpenAI:
    return sdk(responses_server, openai_schemas)


@pytest.fixture(scope="module")
def other_client(responses_server: RunningServer, openai_schemas: dict[str, Any]) -> openai.OpenAI:
    return sdk(responses_server, openai_schemas, OTHER_KEY)


def check_order(events: list[Any]) -> None:
    """OpenAI's order: created, in_progress; each item added, its content or arguments, done; then the end.
    Sequence numbers count from 0 without a gap."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert sum(k in ("response.completed", "response.incomplete", "response.failed") for k in kinds) == 1
    open_item = None
    for event in events[2:-1]:
        if event.type == "response.output_item.added":
            assert open_item is None, "an item opens after the one before it is done"
            open_item = event.item
            assert event.output_index == sum(
                e.type == "response.output_item.done" for e in events[: events.index(event)]
            )
        elif event.type == "response.output_item.done":
            assert open_item is not None and event.item.id == open_item.id
            open_item = None
        else:
            assert open_item is not None and event.item_id == open_item.id, f"{event.type} outside its item"
            if open_item.type == "message":
                assert event.type.startswith(("response.content_part.", "response.output_text."))
            else:
                assert event.type.startswith("response.function_call_arguments.")
    assert open_item is None
    final = events[-1].response
    assert [item.id for item in final.output] == [e.item.id for e in events if e.type == "response.output_item.done"]


def streamed_text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# --- answers -------------------------------------------------------------------------------------------------


def test_whole_and_streamed_answers_are_the_same_and_match_chat_completions(
    client: openai.OpenAI, variants: Variants
) -> None:
    request: dict[str, Any] = dict(
        model=variants.plain, instructions="Answer briefly.", input=QUESTION, temperature=0, max_output_tokens=40
    )
    whole = client.responses.create(**request)
    assert whole.status == "completed" and whole.object == "response" and whole.id.startswith("resp_")
    assert whole.output_text and [item.type for item in whole.output] == ["message"]
    assert whole.instructions == "Answer briefly." and whole.temperature == 0 and whole.max_output_tokens == 40
    usage = whole.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 40
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    events = list(client.responses.create(stream=True, **request))
    check_order(events)
    assert streamed_text(events) == whole.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == usage.output_tokens

    # The same serving path as chat completions: the same messages give the same greedy text.
    chat = client.chat.completions.create(
        model=variants.plain,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
    )
    assert chat.choices[0].message.content == whole.output_text
    assert chat.usage is not None and chat.usage.prompt_tokens == usage.input_tokens


def test_the_sdk_stream_helper_gives_the_final_response(client: openai.OpenAI, variants: Variants) -> None:
    with client.responses.stream(model=variants.plain, input=QUESTION, temperature=0, max_output_tokens=30) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) != ""
    assert client.responses.retrieve(final.id).output_text == final.output_text  # stored as it was streamed


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI, variants: Variants) -> None:
    request: dict[str, Any] = dict(
        model=variants.plain,
        input="Count from 1 to 100, separated by commas.",
        temperature=0,
        max_output_tokens=5,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    whole = client.responses.create(**request)
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens" and whole.output[0].status == "incomplete"
    assert whole.usage is not None and whole.usage.output_tokens == 5
    logprobs = whole.output[0].content[0].logprobs
    assert logprobs is not None and len(logprobs) == 5 and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert "".join(lp.token for lp in logprobs) == whole.output_text
    events = list(client.responses.create(stream=True, **request))
    check_order(events)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert streamed_text(events) == whole.output_text
    assert sum(len(e.logprobs) for e in events if e.type == "response.output_text.delta") == 5


# --- conversations -------------------------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation_from_the_prefix_cache(
    client: openai.OpenAI, variants: Variants
) -> None:
    turns = ["My name is Ada and I like green.", "What is my favourite colour?", "And what is my name?"]
    responses = []
    for turn in turns:
        previous = responses[-1].id if responses else None
        responses.append(
            client.responses.create(
                model=variants.plain,
                instructions="You are a helpful assistant.",
                input=turn,
                previous_response_id=previous,
                temperature=0,
                max_output_tokens=24,
            )
        )
    usages = [r.usage for r in responses]
    assert all(u is not None for u in usages)
    for before, after in itertools.pairwise(usages):
        # The earlier turns are in the prompt, and they are the same tokens as before: the engine finds them.
        assert after.input_tokens > before.input_tokens + before.output_tokens
        assert after.input_tokens_details.cached_tokens >= before.input_tokens + before.output_tokens - 2
        assert after.input_tokens_details.cached_tokens > before.input_tokens_details.cached_tokens
    assert responses[2].previous_response_id == responses[1].id

    # The model saw exactly the earlier turns: the whole conversation sent as items gives the same answer.
    items: list[dict[str, Any]] = []
    for turn, response in zip(turns, responses[:2], strict=False):
        items += [{"role": "user", "content": turn}, {"role": "assistant", "content": response.output_text}]
    explicit = client.responses.create(
        model=variants.plain,
        instructions="You are a helpful assistant.",
        input=[*items, {"role": "user", "content": turns[2]}],
        temperature=0,
        max_output_tokens=24,
        store=False,
    )
    assert explicit.output_text == responses[2].output_text
    listed = client.responses.input_items.list(responses[2].id)
    assert [item.type for item in listed.data] == ["message"] and listed.data[0].content[0].text == turns[2]


def test_store_false_keeps_nothing(client: openai.OpenAI, variants: Variants) -> None:
    response = client.responses.create(
        model=variants.plain, input=QUESTION, temperature=0, max_output_tokens=8, store=False
    )
    assert response.status == "incomplete" and not response.store  # cut at 8 tokens: incomplete, not stored
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model=variants.plain, input="More?", previous_response_id=response.id)
    assert raised.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_a_stored_response_belongs_to_the_key_that_made_it(
    client: openai.OpenAI, other_client: openai.OpenAI, responses_server: RunningServer
) -> None:
    mine = client.responses.create(
        model=LLAMACPP_VARIANTS.plain, input=QUESTION, metadata={"run": "r1"}, temperature=0, max_output_tokens=8
    )
    assert client.responses.retrieve(mine.id).metadata == {"run": "r1"}
    for attempt in (
        lambda: other_client.responses.retrieve(mine.id),
        lambda: other_client.responses.input_items.list(mine.id),
        lambda: other_client.responses.delete(mine.id),
        lambda: other_client.responses.create(model=LLAMACPP_VARIANTS.plain, input="x", previous_response_id=mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client.responses.retrieve(mine.id).id == mine.id  # still there for its owner
    client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)
    unauthorized = httpx.get(f"{responses_server.base_url}/v1/responses/{mine.id}")
    assert unauthorized.status_code == 401


# --- tools and structured output -----------------------------------------------------------------------------


def calls_of(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_tool_choices_give_valid_function_calls(
    client: openai.OpenAI, variants: Variants, stream: bool
) -> None:
    choices: list[Any] = ["required", {"type": "function", "name": "get_time"}]
    for tool_choice, names in zip(choices, [{"get_weather", "get_time"}, {"get_time"}], strict=True):
        for seed in range(2):
            request: dict[str, Any] = dict(
                model=variants.plain,
                input="What is the weather in Paris right now?",
                tools=TOOLS,
                tool_choice=tool_choice,
                parallel_tool_calls=False,
                temperature=1.0,
                extra_body={"seed": seed},  # clemproxy's, as on chat completions
                max_output_tokens=100,
                store=False,
            )
            if stream:
                events = list(client.responses.create(stream=True, **request))
                check_order(events)
                response = events[-1].response
                added = [e for e in events if e.type == "response.output_item.added"]
                assert [e.item.arguments for e in added] == [""]  # arguments come as deltas
                deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
                assert deltas == calls_of(response)[0].arguments
            else:
                response = client.responses.create(**request)
            assert response.status == "completed" and [item.type for item in response.output] == ["function_call"]
            (call,) = calls_of(response)
            assert call.name in names and call.call_id.startswith("call_") and call.id.startswith("fc_")
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


def test_a_function_call_output_round_trip(client: openai.OpenAI, variants: Variants) -> None:
    first = client.responses.create(
        model=variants.plain,
        input="What is the weather in Paris right now?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=60,
    )
    (call,) = calls_of(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "clear", "c": 21})}
    continued = client.responses.create(
        model=variants.plain,
        previous_response_id=first.id,
        input=[result],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=30,
    )
    assert continued.output and continued.usage is not None and first.usage is not None
    # The call and its output follow the first prompt, which the engine still holds.
    assert continued.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert continued.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # The same turn with every item sent back by the client, as stateless agents do.
    explicit = client.responses.create(
        model=variants.plain,
        input=[
            {"role": "user", "content": "What is the weather in Paris right now?"},
            call.model_dump(exclude_none=True),
            result,
        ],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=30,
        store=False,
    )

    def answer(response: Any) -> list[tuple[str, str]]:
        return [(i.type, i.content[0].text if i.type == "message" else i.arguments) for i in response.output]

    assert answer(explicit) == answer(continued)
    items = client.responses.input_items.list(continued.id, order="asc").data
    assert [(item.type, item.call_id) for item in items] == [("function_call_output", call.call_id)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_json_schema_format_is_followed_every_time(client: openai.OpenAI, variants: Variants, stream: bool) -> None:
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        request: dict[str, Any] = dict(
            model=variants.plain,
            input="Describe a person who plays a word game, as JSON.",
            text=text,
            temperature=1.0,
            extra_body={"seed": seed},
            max_output_tokens=120,
            store=False,
        )
        if stream:
            events = list(client.responses.create(stream=True, **request))
            check_order(events)
            answer = streamed_text(events)
            assert events[-1].response.text.format.type == "json_schema"
        else:
            answer = client.responses.create(**request).output_text
        jsonschema.validate(json.loads(answer), PERSON)
    parsed = client.responses.parse(
        model=variants.plain, input="A player, as JSON.", text_format=Player, temperature=0, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, Player)


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"previous_response_id": "resp_never_made"}, 404, "previous_response_id"),
        ({"input": "Hello " * 200, "model": "small"}, 400, "input"),
        ({"max_output_tokens": 100000}, 400, "input"),
        ({"tools": [{"type": "web_search_preview"}]}, 400, "tools[0].type"),
        ({"reasoning": {"summary": "auto"}}, 400, "reasoning.summary"),
        ({"background": True}, 400, "background"),
        ({"include": ["reasoning.encrypted_content"]}, 400, "include[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
         "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input[0].call_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
        ({"input": []}, 400, "input"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "missing"}}, 400, "tool_choice.name"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}}, 400,
         "text.format.schema"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"temperature": 3}, 400, "temperature"),
    ],
    ids=[
        "unknown-model", "unknown-previous", "context-overflow", "too-many-tokens", "built-in-tool", "summary",
        "background", "include", "image", "unanswered-call", "item-reference", "empty-input", "unknown-named-tool",
        "bad-schema", "metadata", "temperature",
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_requests_get_an_error_before_any_event(
    responses_server: RunningServer, variants: Variants, change: dict[str, Any], status: int, param: str, stream: bool
) -> None:
    body: dict[str, Any] = {"model": variants.plain, "input": QUESTION, "max_output_tokens": 8, "stream": stream}
    body.update(change)
    if body["model"] == "small":
        body["model"] = variants.small_context
    answer = httpx.post(
        f"{responses_server.base_url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")  # no stream was started
    error = answer.json()["error"]
    assert error["param"] == param and error["message"]
    healthy = httpx.get(f"{responses_server.base_url}/health", timeout=10)
    assert healthy.status_code == 200


def test_responses_carry_the_fields_open_responses_requires_and_reasoning_effort(
    client: openai.OpenAI, responses_server: RunningServer, variants: Variants
) -> None:
    answer = client.responses.create(
        model=variants.plain,
        input=QUESTION,
        max_output_tokens=8,
        reasoning={"effort": "low"},
        safety_identifier="player-1",
        prompt_cache_key="game-7",
    )
    fields = answer.model_dump()
    for key in ("presence_penalty", "frequency_penalty", "max_tool_calls"):
        assert key in fields and fields[key] is None, key
    assert fields["safety_identifier"] == "player-1" and fields["prompt_cache_key"] == "game-7"
    assert fields["reasoning"]["effort"] == "low"
    compact = httpx.post(
        f"{responses_server.base_url}/v1/responses/compact",
        json={"model": variants.plain, "input": QUESTION},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert compact.status_code == 404 and "Compaction" in compact.json()["error"]["message"]


# --- the store itself ----------------------------------------------------------------------------------------


def stored(response_id: str, owner: str = "", created_at: float | None = None) -> StoredResponse:
    return StoredResponse(response_id, owner, created_at or time.time(), {"id": response_id}, [], [])


def test_the_store_is_bounded_by_age_and_count_and_keeps_owners_apart(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    unbounded = ResponseStore(data, max_age=0, max_count=0)
    unbounded.save(stored("old", created_at=time.time() - 7200))
    store = ResponseStore(data, max_age=3600, max_count=3)  # a second server on the same file
    assert store.count() == 1 and store.get("old", "") is None  # expired: never read back, even before pruning
    for index in range(5):
        store.save(stored(f"r{index}", owner="alice"))  # each write prunes: by age, then the oldest beyond 3
    kept = [store.get(f"r{i}", "alice") is not None for i in range(5)]
    assert store.count() == 3 and kept == [False, False, True, True, True]
    assert store.get("r4", "bob") is None and not store.delete("r4", "bob") and store.delete("r4", "alice")
    store.close()
    assert unbounded.get("r3", "alice") is not None and (tmp_path / "data" / "responses.sqlite3").exists()
    unbounded.close()
    memory = ResponseStore(":memory:", max_age=0, max_count=0)
    memory.save(stored("m"))
    assert memory.get("m", "") is not None and not list(tmp_path.glob("*.sqlite3"))
    memory.close()


def test_a_store_that_cannot_be_written_is_a_clear_500_and_store_false_still_works(
    tmp_path: Path, smol_checkpoint: Path, openai_schemas: dict[str, Any]
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the data folder should be")
    registry = ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", [smol_entry("smol")])])
    with RunningServer(registry, Settings(storage=StorageSettings(data_dir=str(blocked)))) as server:
        client = sdk(server, openai_schemas, "unused")
        with pytest.raises(openai.InternalServerError) as raised:
            client.responses.create(model="smol", input=QUESTION, max_output_tokens=4)
        assert raised.value.body["code"] == "response_store_unavailable"  # type: ignore[index]
        assert "--data-dir" in raised.value.body["message"]  # type: ignore[index]
        answer = client.responses.create(model="smol", input=QUESTION, max_output_tokens=4, store=False)
        assert answer.status in ("completed", "incomplete")


def test_a_stream_cut_short_ends_with_response_failed(tmp_path: Path, openai_schemas: dict[str, Any]) -> None:
    """An unload that cannot wait ends the running stream: its last event is ``response.failed`` with the text
    sent so far; an ``openai_compatible`` entry is refused with a 400 (its upstream would keep the state)."""
    entries = [
        smol_entry("smol"),
        {"model_name": "remote", "backend": "openai_compatible", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
    ]
    registry = ModelRegistry.from_files([write_registry(tmp_path / "model_registry.json", entries)])
    settings = Settings(manager=ManagerSettings(unload_timeout=0.2), storage=StorageSettings(data_dir=":memory:"))
    with RunningServer(registry, settings) as server:
        client = sdk(server, openai_schemas, "unused")
        events = []
        stream = client.responses.create(
            model="smol",
            input="Count from 1 to 100, separated by commas.",
            temperature=0,  # greedy, it counts on past the unload
            max_output_tokens=300,
            stream=True,
        )
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 6:
                unloaded = httpx.post(f"{server.base_url}/admin/api/models/smol/unload", timeout=60)
                assert unloaded.json()["state"] == "unloaded"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        failed = events[-1]
        assert failed.type == "response.failed" and failed.response.status == "failed"
        assert failed.response.error.code == "server_error" and "unload" in failed.response.error.message
        assert failed.response.output[0].content[0].text == streamed_text(events)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(failed.response.id)  # only a whole answer is stored
        with pytest.raises(openai.BadRequestError) as raised:
            client.responses.create(model="remote", input=QUESTION)
        assert raised.value.body["param"] == "model"  # type: ignore[index]
        assert client.responses.create(model="smol", input=QUESTION, max_output_tokens=4).output_text  # loads again


def test_a_stream_that_times_out_in_the_queue_is_created_then_failed(
    tmp_path: Path, openai_schemas: dict[str, Any]
) -> None:
    """Past --request-timeout while it waits for its turn, after its headers: created, in_progress, failed."""
    registry = ModelRegistry.from_files(
        [write_registry(tmp_path / "model_registry.json", [smol_entry("smol", parallel=1)])]
    )
    settings = Settings(manager=ManagerSettings(request_timeout=1.5), storage=StorageSettings(data_dir=":memory:"))
    with RunningServer(registry, settings) as server:
        client = sdk(server, openai_schemas, "unused")
        # Loaded through the admin API: a load does not count against the request timeout, a first answer would
        # (and on a busy machine its 2 tokens could take longer than 1.5 s).
        loaded = httpx.post(f"{server.base_url}/admin/api/models/smol/load", timeout=300)
        assert loaded.status_code == 200, loaded.text
        busy = StreamInThread(server.base_url, "busy", model="smol", max_tokens=2000)
        wait_until(lambda: server.services.manager.slot("smol").queue.admitted == 1, "the slot is busy")
        events = list(client.responses.create(model="smol", input=QUESTION, max_output_tokens=8, stream=True))
        busy.join()
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert [e.sequence_number for e in events] == [0, 1, 2]
    assert "--request-timeout" in events[-1].response.error.message and events[-1].response.output == []

"""Reasoning apart from the answer: the parser on the output layouts of real reasoning models, and the real demo
model made to reason (an entry's cot_* keys over what it really writes; templates that open a reasoning block),
through a real server and the openai SDK, whole and streamed, on both backends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from backends import ModelRegistry
from backends.text.reasoning import ReasoningParser, reasoning_format, split_reasoning
from proxy.settings import Settings
from tests.support import CHATML_VIA_SPECIAL_TOKENS, COLORS, RunningServer, smol_entry, smol_hf_entry, write_registry

# --- the parser, on the layouts real models write ------------------------------------------------------

QWEN3_TEMPLATE = "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}... <think> ... </think>"
GPT_OSS_TEMPLATE = "<|start|>assistant<|channel|>analysis<|message|>{{ thinking }}<|end|> ... final"
GPT_OSS_END = (
    "<\\|end\\|><\\|start\\|>assistant(<\\|channel\\|>commentary to=assistant)*<\\|channel\\|>final<\\|message\\|>"
)


def streamed(text: str, format: Any, step: int) -> tuple[str, str]:
    parser = ReasoningParser(format)
    for at in range(0, len(text), step):
        parser.feed(text[at : at + step])
    parser.finish()
    return parser.reasoning, parser.content


LAYOUTS = [
    # Qwen3: the block opens in the output
    (
        reasoning_format({}, QWEN3_TEMPLATE, "<|im_start|>assistant\n"),
        "<think>\nThe user wants 2+2.\n</think>\n\n4",
        ("\nThe user wants 2+2.\n", "4"),
    ),
    # DeepSeek-R1 (and Qwen3-Thinking): the template opens it in the prompt, the output starts inside
    (
        reasoning_format({}, "<think>…</think>", "<｜Assistant｜><think>\n"),
        "Okay, 2+2 is 4.\n</think>\n\nThe answer is **4**.",
        ("Okay, 2+2 is 4.\n", "The answer is **4**."),
    ),
    # gpt-oss, from its template's harmony channels
    (
        reasoning_format({}, GPT_OSS_TEMPLATE, "<|start|>assistant"),
        "<|channel|>analysis<|message|>Simple sum.<|end|><|start|>assistant<|channel|>final<|message|>4",
        ("Simple sum.", "4"),
    ),
    # gpt-oss straight to its final channel: no reasoning
    (reasoning_format({}, GPT_OSS_TEMPLATE, "<|start|>assistant"), "<|channel|>final<|message|>4", ("", "4")),
    # gpt-oss through clembench's entry keys (clemcore's own cot_end_tag)
    (
        reasoning_format(
            {"cot_output": True, "cot_start_tag": "<|channel|>analysis<|message|>", "cot_end_tag": GPT_OSS_END}, "", ""
        ),
        "<|channel|>analysis<|message|>Simple sum.<|end|><|start|>assistant<|channel|>final<|message|>4",
        ("Simple sum.", "4"),
    ),
    # a length stop inside the reasoning: no answer, and no reasoning in it
    (
        reasoning_format({}, "<think>…</think>", "<｜Assistant｜><think>\n"),
        "Okay, let me count: one, two, th",
        ("Okay, let me count: one, two, th", ""),
    ),
    # no markers at all in a thinking template's output: all of it is the answer
    (reasoning_format({}, QWEN3_TEMPLATE, "<|im_start|>assistant\n"), "Just 4.", ("", "Just 4.")),
]


@pytest.mark.parametrize(("format", "text", "expected"), LAYOUTS)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_parser_splits_each_layout_whole_and_streamed(format: Any, text: str, expected: Any, step: int) -> None:
    assert format is not None
    assert split_reasoning(text, format) == expected
    assert streamed(text, format, step) == expected


def test_no_format_where_the_template_has_no_reasoning_or_a_prefill_closed_it() -> None:
    assert reasoning_format({}, "{{ messages }}", "assistant\n") is None
    assert reasoning_format({}, QWEN3_TEMPLATE, "<|im_start|>assistant\n<think>\n\n</think>\n\n") is None


# --- the real model, made to reason --------------------------------------------------------------------

SPLIT_AT = "2\\. "  # a cot_end_tag the demo model really writes in its answer to COLORS
THINKING = CHATML_VIA_SPECIAL_TOKENS.replace(
    "assistant\n{{ answer_prefix | default('') }}", "assistant\n<think>\n{{ answer_prefix | default('') }}"
)
assert "<think>" in THINKING
THINKING += "{# a thinking template: <think> … </think> #}"
HARMONY = CHATML_VIA_SPECIAL_TOKENS.replace(
    "{{ bos_token }}assistant\n{{ answer_prefix | default('') }}",
    "<|start|>assistant<|channel|>analysis<|message|>",
)
assert HARMONY.endswith("<|start|>assistant<|channel|>analysis<|message|>{% endif %}")
EFFORT = (
    "{% if reasoning_effort == 'low' %}Be brief.{% else %}Think it through, step by step, as long as it takes, "
    "and check every step twice before you answer.{% endif %}\n" + CHATML_VIA_SPECIAL_TOKENS
)
BYPASS = "<think>\nNo need to think.\n</think>\n"


def entries(make: Any, suffix: str) -> list[dict[str, Any]]:
    return [
        make(f"cot{suffix}", cot_output=True, cot_end_tag=SPLIT_AT),
        make(f"think{suffix}", premade_chat_template=False, custom_chat_template=THINKING),
        make(f"harmony{suffix}", premade_chat_template=False, custom_chat_template=HARMONY),
        make(f"bypass{suffix}", premade_chat_template=False, custom_chat_template=THINKING, cot_bypass=BYPASS),
        make(f"effort{suffix}", premade_chat_template=False, custom_chat_template=EFFORT, cot_effort="low"),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smol_checkpoint: Path) -> Iterator[RunningServer]:
    listed = entries(smol_entry, "") + entries(lambda name, **kw: smol_hf_entry(name, smol_checkpoint, **kw), "-hf")
    path = write_registry(tmp_path_factory.mktemp("reasoning") / "model_registry.json", listed)
    with RunningServer(ModelRegistry.from_files([path]), Settings.of(threads_follow_load=False)) as running:
        yield running


@pytest.fixture(params=["", "-hf"], ids=["llamacpp", "huggingface_local"])
def suffix(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def ask(server: RunningServer, model: str, max_tokens: int = 40, **extra: Any) -> Any:
    return client(server).chat.completions.create(
        model=model, messages=COLORS, max_tokens=max_tokens, temperature=0, **extra
    )


def ask_streamed(server: RunningServer, model: str, max_tokens: int = 40, **extra: Any) -> tuple[str, str, list[Any]]:
    chunks = list(
        client(server).chat.completions.create(
            model=model, messages=COLORS, max_tokens=max_tokens, temperature=0, stream=True, **extra
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    return reasoning, content, deltas


def test_cot_keys_split_as_clemcore_does_whole_and_streamed(server: RunningServer, suffix: str) -> None:
    model = f"cot{suffix}"
    raw = ask(server, model, extra_body={"reasoning_format": "none"}).choices[0].message.content
    parts = re.split(SPLIT_AT, raw)
    # the demo model really writes the marker
    whole = ask(server, model).choices[0].message
    assert len(parts) == 2, raw
    assert whole.content == parts[-1].strip()  # clemcore's answer: the last part, stripped
    assert whole.reasoning_content == parts[0] and whole.model_extra["reasoning"] == parts[0]
    reasoning, content, _ = ask_streamed(server, model)
    assert (reasoning, content) == (whole.reasoning_content, whole.content)


def test_a_template_that_opens_the_block_leaves_a_cut_off_reasoning_out_of_content(
    server: RunningServer, suffix: str
) -> None:
    for model in (f"think{suffix}", f"harmony{suffix}"):
        answer = ask(server, model, max_tokens=8)
        message = answer.choices[0].message
        assert answer.choices[0].finish_reason == "length"
        assert message.content == "" and message.model_extra["reasoning_content"], (model, message)
        assert "<think>" not in message.reasoning_content and "<|channel|>" not in message.reasoning_content
        reasoning, content, _ = ask_streamed(server, model, max_tokens=8)
        assert (reasoning, content) == (message.reasoning_content, "")
        raw = ask(server, model, max_tokens=8, extra_body={"reasoning_format": "none"}).choices[0].message
        assert raw.content == message.reasoning_content and raw.model_extra.get("reasoning_content") is None


def test_cot_bypass_prefills_an_empty_reasoning_and_the_model_answers_at_once(
    server: RunningServer, suffix: str
) -> None:
    message = ask(server, f"bypass{suffix}").choices[0].message
    assert message.content and message.model_extra.get("reasoning_content") is None
    assert "</think>" not in message.content
    reasoning, content, _ = ask_streamed(server, f"bypass{suffix}")
    assert (reasoning, content) == ("", message.content)
    longer = ask(server, f"think{suffix}").usage.prompt_tokens
    assert ask(server, f"bypass{suffix}").usage.prompt_tokens > longer  # the prefill is in the prompt


def test_cot_effort_and_a_requests_reasoning_effort_reach_the_template(server: RunningServer, suffix: str) -> None:
    model = f"effort{suffix}"
    low = ask(server, model).usage.prompt_tokens  # the entry's cot_effort: "low"
    by_kwargs = ask(server, model, extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}).usage
    by_field = ask(server, model, reasoning_effort="high").usage
    assert low < by_kwargs.prompt_tokens == by_field.prompt_tokens


def test_messages_carry_annotations_and_history_reasoning_is_accepted(server: RunningServer, suffix: str) -> None:
    first = ask(server, f"cot{suffix}")
    message = first.choices[0].message
    assert message.annotations == []
    history = [
        *COLORS,
        {"role": "assistant", "content": message.content, "reasoning_content": message.reasoning_content},
        {"role": "user", "content": "And one more?"},
    ]
    follow = client(server).chat.completions.create(model=f"cot{suffix}", messages=history, max_tokens=8, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_the_responses_api_gives_a_reasoning_item_then_the_message(
    server: RunningServer, suffix: str, openai_schemas: dict[str, Any]
) -> None:
    import httpx

    from tests.support import SchemaCheckingTransport

    http_client = httpx.Client(transport=SchemaCheckingTransport(openai_schemas), timeout=120)
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client)
    model = f"cot{suffix}"
    chat = ask(server, model).choices[0].message
    question = COLORS[0]["content"]
    whole = sdk.responses.create(model=model, input=question, max_output_tokens=40, temperature=0)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert whole.output[0].content[0].text == chat.reasoning_content
    assert whole.output_text == chat.content
    events = list(sdk.responses.create(model=model, input=question, max_output_tokens=40, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == chat.reasoning_content
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == chat.content
    # The stored conversation, reasoning item included, continues.
    follow = sdk.responses.create(
        model=model, previous_response_id=whole.id, input="And one more?", max_output_tokens=8, temperature=0
    )
    assert follow.status in ("completed", "incomplete")


PLAYER = {
    "type": "json_schema",
    "json_schema": {
        "name": "player",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
}


def test_a_json_schema_holds_the_answer_after_the_reasoning(server: RunningServer, suffix: str) -> None:
    import json

    model = f"think{suffix}"
    # The demo model would reason on to max_tokens: a budget ends its reasoning, and the answer is the JSON.
    budget = {"reasoning_budget": 16}
    answer = ask(server, model, max_tokens=120, response_format=PLAYER, extra_body=budget)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "stop", message
    assert set(json.loads(message.content)) == {"name"}  # the answer is the JSON, the reasoning apart
    assert message.model_extra["reasoning_content"]
    raw = ask(server, model, max_tokens=120, response_format=PLAYER, extra_body={**budget, "reasoning_format": "none"})
    assert raw.choices[0].message.content.count("</think>") == 1
    assert raw.choices[0].message.content.endswith(message.content)
    reasoning, content, _ = ask_streamed(server, model, max_tokens=120, response_format=PLAYER, extra_body=budget)
    assert set(json.loads(content)) == {"name"} and reasoning


def test_a_reasoning_budget_ends_the_reasoning(server: RunningServer, suffix: str) -> None:
    model = f"think{suffix}"
    spent = ask(server, model, max_tokens=8, extra_body={"reasoning_budget": 8})
    assert spent.choices[0].finish_reason == "length" and spent.choices[0].message.content == ""
    unbounded = ask(server, model, max_tokens=40).choices[0].message  # reasons on to max_tokens
    assert unbounded.content == ""
    for field in ("reasoning_budget", "thinking_token_budget"):
        raw = ask(server, model, max_tokens=40, extra_body={field: 8, "reasoning_format": "none"})
        text = raw.choices[0].message.content
        assert text.count("</think>") == 1, text  # the engine ended the reasoning there
        bounded = ask(server, model, max_tokens=40, extra_body={field: 8}).choices[0].message
        assert bounded.model_extra["reasoning_content"] == text.split("</think>")[0]
        assert len(bounded.model_extra["reasoning_content"]) < len(unbounded.model_extra["reasoning_content"])
    none = ask(server, model, max_tokens=24, extra_body={"reasoning_budget": 0, "reasoning_format": "none"})
    assert none.choices[0].message.content.startswith("</think>")

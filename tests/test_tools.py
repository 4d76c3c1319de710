"""Tool calling's parts without a server: the parser of calls in streamed text, the grammars, how tools and tool
messages reach a chat template, and the compiled-grammar cache on the real model's vocabulary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backends.text.grammar import check_json_schema, grammar_problem, json_schema_grammar, lark_grammar
from backends.text.prompting import ChatTemplate
from backends.text.tools import CallArguments, CallStart, Content, ToolCallParser, call_grammar

FUNCTIONS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
]
TEXT = (
    "Let me check.\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": "Paris <3", "nested": {"a": [1, {}]}}})
    + "\n</tool_call>\n<tool_call>\n"
    + json.dumps({"name": "get_time", "arguments": {}})
    + "\n</tool_call>"
)


def pieces_of(text: str, step: int) -> tuple[ToolCallParser, list[Any]]:
    parser = ToolCallParser()
    pieces = []
    for at in range(0, len(text), step):
        pieces += parser.feed(text[at : at + step])
    return parser, pieces + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, 1000])
def test_streamed_pieces_make_the_same_calls_whatever_the_chunks(step: int) -> None:
    parser, pieces = pieces_of(TEXT, step)
    assert [(c.name, c.arguments) for c in parser.calls] == [
        ("get_weather", json.dumps({"city": "Paris <3", "nested": {"a": [1, {}]}})),
        ("get_time", "{}"),
    ]
    assert parser.content == "Let me check.\n\n"
    starts = [p for p in pieces if isinstance(p, CallStart)]
    assert [p.index for p in starts] == [0, 1] and [p.id for p in starts] == [c.id for c in parser.calls]
    for call in parser.calls:  # the arguments' pieces add up to the call's arguments, after its start
        index = parser.calls.index(call)
        assert "".join(p.text for p in pieces if isinstance(p, CallArguments) and p.index == index) == call.arguments
        first = next(i for i, p in enumerate(pieces) if isinstance(p, CallArguments) and p.index == index)
        assert pieces.index(starts[index]) < first


def test_text_without_calls_is_content_and_a_broken_call_stays_text() -> None:
    parser, pieces = pieces_of("Just text, with a < and <tool", 4)
    assert parser.content == "Just text, with a < and <tool" and not parser.calls
    assert all(isinstance(p, Content) for p in pieces)
    broken = "<tool_call>\nnot json\n</tool_call> after"
    parser, _ = pieces_of(broken, 3)
    assert not parser.calls and parser.content == broken
    parser, pieces = pieces_of('  \n<tool_call>\n{"name": "f", "arguments": {"a": "x', 4)  # cut by max_tokens
    assert parser.content is None  # whitespace before a call is no content
    assert [(c.name, c.arguments) for c in parser.calls] == [("f", '{"a": "x')]


@pytest.mark.parametrize("forced", [True, False])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("answer", [None, {"type": "object", "properties": {"x": {"type": "integer"}}}])
def test_call_grammars_are_valid(forced: bool, parallel: bool, answer: Any) -> None:
    grammar = lark_grammar(call_grammar(FUNCTIONS, forced=forced, parallel=parallel, answer_schema=answer))
    assert grammar_problem(grammar) == ""


def test_schema_problems_name_the_field() -> None:
    from backends.errors import GrammarError

    with pytest.raises(GrammarError) as raised:
        check_json_schema({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}, "p.q")
    assert raised.value.param == "p.q" and "cannot be enforced" in raised.value.message
    with pytest.raises(GrammarError):
        check_json_schema(["not", "a", "schema"], "p")
    assert check_json_schema({"type": "object"}, "p") == json_schema_grammar({"type": "object"})


CALLED = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
HISTORY = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "tool_calls": CALLED},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
]
TOOLS = [{"type": "function", "function": FUNCTIONS[0]}]
PLAIN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
WITH_TOOLS = (
    "{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}\n"
    "{% endfor %}"
)


def test_a_template_without_tools_gets_the_default_prompt_and_written_calls() -> None:
    text = ChatTemplate(PLAIN).render(HISTORY, tools=TOOLS, add_generation_prompt=False)
    system, _, assistant, tool = text.strip().split("\n[")
    assert system.startswith("[system] You may call one or more functions") and '"name": "get_weather"' in system
    assert assistant == 'assistant] <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert tool == "user] <tool_response>\n21 degrees\n</tool_response>"


def test_a_template_with_tools_renders_them_itself() -> None:
    template = ChatTemplate(WITH_TOOLS)
    assert template.takes_tools and template.takes_tool_calls
    text = template.render(HISTORY, tools=TOOLS, add_generation_prompt=False)
    assert text.startswith("TOOLS=get_weather\n[user] Weather?")
    assert "CALL get_weather Paris" in text  # the arguments reach it as an object, as HF's templates expect
    assert "[tool] 21 degrees" in text and "You may call" not in text


def test_compiled_grammars_are_cached_per_model(smol_llamacpp: Any) -> None:
    compiler = smol_llamacpp.grammar_compiler()
    grammar = json_schema_grammar({"type": "object", "properties": {"cache_test": {"type": "integer"}}})
    before = compiler.compilations
    first = compiler.compile(grammar)
    assert compiler.compile(grammar) is first and compiler.compilations == before + 1
    one, two = first.matcher(), first.matcher()  # each sequence its own state
    token = int(one.allowed().argmax())
    one.accept(token)
    assert (two.allowed() != one.allowed()).any()

"""What an answer's shape is held to, for chat completions and the Responses API alike: the tools the prompt
shows and the grammar generation follows (tool calls, a JSON Schema). Every schema is checked first, so that a
400 names the field that is wrong before anything is generated or loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from backends.text.grammar import check_json_schema, grammar_problem, lark_grammar
from backends.text.tools import call_grammar
from proxy.errors import APIError

ToolMode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class Function:
    """A function tool as either API declares it; ``param`` is where its parameters sit in the request."""

    name: str
    description: str | None
    parameters: dict[str, Any] | None
    param: str


@dataclass(frozen=True)
class ToolChoice:
    """``tool_choice`` in either API's spelling: a mode, and the function a ``function`` mode names."""

    mode: ToolMode | None  # None: not given (auto when there are tools)
    name: str | None = None
    param: str = "tool_choice"  # where the name sits, for errors


def constraint(
    functions: Sequence[Function],
    choice: ToolChoice,
    *,
    parallel: bool,
    schema: dict[str, Any] | None,
    schema_param: str,
) -> tuple[tuple[dict[str, Any], ...], str | None]:
    """The tools the prompt shows (OpenAI's chat ``tools`` shape) and the grammar the answer must match.

    ``schema`` is the JSON Schema the answer follows (None: free text); tools with a choice other than
    ``none`` constrain each call to its function's parameters, and ``required`` or a named function force one.
    """
    schema_grammar = check_json_schema(schema, schema_param) if schema is not None else None
    if choice.mode not in (None, "none") and not functions:
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    declared = []
    for function in functions:
        declaration = {"name": function.name, "parameters": function.parameters or {"type": "object", "properties": {}}}
        check_json_schema(declaration["parameters"], function.param)
        if function.description is not None:
            declaration["description"] = function.description
        declared.append(declaration)
    names = [f["name"] for f in declared]
    if len(set(names)) != len(names):
        raise APIError(400, "Two tools have the same function name", param="tools", code="invalid_value")
    if not functions or choice.mode == "none":
        return (), schema_grammar
    if choice.mode == "function":
        chosen = [f for f in declared if f["name"] == choice.name]
        if not chosen:
            raise APIError(
                400,
                f"tool_choice names the function '{choice.name}', which is not among the tools",
                param=choice.param,
                code="invalid_value",
            )
    else:
        chosen = declared
    forced = choice.mode in ("required", "function")
    grammar = lark_grammar(call_grammar(chosen, forced=forced, parallel=parallel, answer_schema=schema))
    if problem := grammar_problem(grammar):
        raise APIError(400, f"These tools cannot be enforced together: {problem}", param="tools", code="invalid_schema")
    return tuple({"type": "function", "function": function} for function in declared), grammar

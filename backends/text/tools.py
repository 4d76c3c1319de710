"""Tool calling, the same on every backend: how tools reach the prompt, the grammars that constrain a call, and
the parser that finds calls in what the model wrote.

The call format is the common ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` convention (Hermes,
Qwen, SmolLM and many others are trained on it). A chat template that takes a ``tools`` variable gets the tools
itself; for one that does not, ``DEFAULT_TOOL_PROMPT`` describes them and this format in the system message.

- ``tool_choice: "required"`` or a named function: the grammar (``call_grammar``) forces one call or more, each
  one's arguments valid against its function's ``parameters``, and nothing else.
- ``"auto"``: the model writes freely until it writes ``<tool_call>``; from there the call is constrained in the
  same way (llguidance's lazy lexemes), and free text may follow.
- ``"none"``: no grammar, no parsing, and the tools are left out of the prompt.

``ToolCallParser`` reads the text as it streams and says what is content and what is a call (its name, then
pieces of its arguments), so that a streamed answer and a whole one are made of the same pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.text.grammar import with_json_options

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

DEFAULT_TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query. The functions you can call are described "
    "as JSON Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer with a JSON "
    "object holding its name and its arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The default tool prompt: for chat templates that do not take a ``tools`` variable."""
    return DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def call_schema(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of one call of any of these functions (OpenAI's function objects): its name, then
    arguments valid against that function's ``parameters``."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _lark_string(text: str) -> str:
    return json.dumps(text)


def call_grammar(
    functions: Sequence[Mapping[str, Any]], *, forced: bool, parallel: bool, answer_schema: Any = None
) -> str:
    """A Lark grammar (llguidance's dialect) for calls of these functions.

    ``forced`` (``required`` or a named function): the answer is one call, or several with ``parallel``, and
    nothing else; with ``answer_schema`` (a ``response_format``), either calls or a JSON answer of that schema.
    Otherwise (``auto``) any text, in which each ``<tool_call>`` starts a constrained call.
    """
    schema = json.dumps(with_json_options(call_schema(functions)))
    body = f"call_body: {_lark_string(chr(10))} %json {schema} {_lark_string(chr(10) + CALL_CLOSE)}"
    if not forced and answer_schema is None:  # auto: free text, in which each <tool_call> starts a call
        start = "start: call* TEXT" if parallel else "start: call? TEXT"
        head = f"head[lazy]: TEXT {_lark_string(CALL_OPEN)}"
        return "\n".join([start, head, "call: head call_body", body, "TEXT: /(.|\\n)*/"])
    if forced:
        start = "start: calls"
    else:
        start = f"start: calls | answer\nanswer: %json {json.dumps(with_json_options(answer_schema))}"
    repeat = ' ("\\n" call)*' if parallel else ""
    return "\n".join([start, f"calls: call{repeat}", f"call: {_lark_string(CALL_OPEN)} call_body", body])


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- what the model wrote ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Piece = Content | CallStart | CallArguments

# The start of a call's JSON, up to where its arguments begin (the grammar writes the name first).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# What may follow a call's arguments before the call ends: the closing brace of the call's object.
_ARGUMENTS_TAIL = re.compile(r"\s*\}?\s*$")


@dataclass
class _OpenCall:
    index: int
    body: str = ""
    started: bool = False  # its name is known and sent
    arguments_at: int = 0  # where its arguments begin in ``body``
    sent: int = 0  # of its arguments


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class ToolCallParser:
    """Splits a model's text, as it streams in, into content and tool calls."""

    pieces: list[Piece] = field(default_factory=list)  # everything found so far, in order
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""  # text not yet classified: a possible start of ``CALL_OPEN``, or leading whitespace
    _call: _OpenCall | None = None
    _content_started: bool = False
    _leading: str = ""  # whitespace before any content

    def feed(self, text: str) -> list[Piece]:
        """The pieces this text completes (content held back while it may be the start of a call)."""
        found: list[Piece] = []
        self._buffer += text
        while self._buffer:
            if self._call is None:
                if not self._outside(found):
                    break
            elif not self._inside(found):
                break
        self.pieces.extend(found)
        return found

    def finish(self) -> list[Piece]:
        """What is left when the text ends: held-back content, or the unfinished call's arguments."""
        found: list[Piece] = []
        if self._call is not None:
            call = self._call
            call.body += self._buffer
            self._buffer = ""
            if call.started:
                self._send_arguments(call, found, final=True)
            else:
                found.append(Content(CALL_OPEN + call.body))
            self._call = None
        else:
            self._send_content(self._buffer, found)
        if not self._content_started and self._leading and not self.calls:
            found.append(Content(self._leading))
        self._buffer = self._leading = ""
        self.pieces.extend(found)
        return found

    @property
    def content(self) -> str | None:
        text = "".join(p.text for p in self.pieces if isinstance(p, Content))
        return None if self.calls and not text.strip() else text

    def _outside(self, found: list[Piece]) -> bool:
        at = self._buffer.find(CALL_OPEN)
        if at >= 0:
            self._send_content(self._buffer[:at], found)
            self._buffer = self._buffer[at + len(CALL_OPEN) :]
            self._call = _OpenCall(index=len(self.calls))
            self.calls.append(ParsedCall(id=new_call_id(), name="", arguments=""))
            return True
        keep = _partial_suffix(self._buffer, CALL_OPEN)
        ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
        self._send_content(ready, found)
        return False

    def _send_content(self, text: str, found: list[Piece]) -> None:
        """Content, except leading whitespace, which waits for text (a call's answer has no content)."""
        if not self._content_started:
            self._leading += text
            if not self._leading.strip():
                return
            text, self._leading = self._leading, ""
            self._content_started = True
        if text:
            found.append(Content(text))

    def _inside(self, found: list[Piece]) -> bool:
        call = self._call
        assert call is not None
        at = self._buffer.find(CALL_CLOSE)
        keep = 0 if at >= 0 else _partial_suffix(self._buffer, CALL_CLOSE)
        end = at if at >= 0 else len(self._buffer) - keep
        call.body += self._buffer[:end]
        self._buffer = self._buffer[end + len(CALL_CLOSE) :] if at >= 0 else self._buffer[end:]
        if not call.started:
            head = _HEAD.match(call.body)
            if head is not None and head.end() < len(call.body):  # the arguments have begun: no more whitespace
                name = _json_string(head.group(1))
                self.calls[call.index].name = name
                call.started = True
                call.arguments_at = head.end()
                found.append(CallStart(call.index, self.calls[call.index].id, name))
        if at < 0:
            if call.started:
                self._send_arguments(call, found, final=False)
            return False
        if call.started:
            self._send_arguments(call, found, final=True)
        else:  # not a call after all (no grammar held it to the format): its text is content
            self._send_content(CALL_OPEN + call.body + CALL_CLOSE, found)
            self.calls.pop()
        self._call = None
        return True

    def _send_arguments(self, call: _OpenCall, found: list[Piece], final: bool) -> None:
        text = call.body[call.arguments_at :]
        if final:
            end = _json_end(text)
            ready = text[:end] if end is not None else text[: len(text) - len(_ARGUMENTS_TAIL.search(text)[0])]  # type: ignore[index]
        else:
            ready = text[: len(text) - len(_ARGUMENTS_TAIL.search(text)[0])]  # type: ignore[index]
        if len(ready) > call.sent:
            piece = ready[call.sent :]
            call.sent = len(ready)
            self.calls[call.index].arguments += piece
            found.append(CallArguments(call.index, piece))


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` are the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _json_string(escaped: str) -> str:
    try:
        return str(json.loads(f'"{escaped}"'))
    except json.JSONDecodeError:
        return escaped


def _json_end(text: str) -> int | None:
    """Where the JSON value at the start of ``text`` ends, or None if it is not one."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return int(end)

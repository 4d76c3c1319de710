"""Reasoning apart from the answer: which markers a model's output uses, and a parser that splits it as it streams.

A reasoning model writes its reasoning, then the answer: ``<think>…</think>answer`` (Qwen3, DeepSeek-R1 and its
distills, GLM-4.5, Hunyuan), or harmony's channels (gpt-oss: ``<|channel|>analysis<|message|>…<|end|><|start|>
assistant<|channel|>final<|message|>answer``). Where the markers come from, first match wins:

1. the entry's clembench keys (``cot_output``: reasoning is expected; the answer follows the first match of
   ``cot_end_tag``, a regular expression as in clemcore; ``cot_start_tag`` is removed), so that a clembench entry
   splits as clemcore's own backend splits it;
2. the chat template the prompt was rendered with: ``<think>``/``</think>`` in its source, or harmony's channels.
   A template that opens the block in the prompt (its generation prompt ends with ``<think>``) has the output
   start inside it.

The parser holds back only what could still become a marker (``regex``'s partial matches), so that a stream's
pieces join to the whole answer's. A text that ends inside the reasoning (a ``length`` stop) has no answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import regex

THINK_START, THINK_END = "<think>", "</think>"
HARMONY_START = "<|channel|>analysis<|message|>"
# The end of harmony's analysis and the start of its final channel; an answer may also start there directly.
HARMONY_END = (
    r"(?:<\|end\|>)?(?:<\|start\|>assistant)?(?:<\|channel\|>commentary to=assistant)*<\|channel\|>final<\|message\|>"
)


@dataclass(frozen=True)
class ReasoningFormat:
    """How one prompt's output marks its reasoning."""

    start: str  # the literal that opens the reasoning ("" where the output is in it from the first token)
    end: str  # a regular expression (``regex``'s syntax, Python's) between the reasoning and the answer
    starts_inside: bool  # the output begins inside the reasoning (the prompt opened the block, or cot_output)
    source: Literal["entry", "template"] = "template"

    def fields(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "starts_inside": self.starts_inside, "source": self.source}

    @classmethod
    def of(cls, fields: dict[str, Any] | None) -> ReasoningFormat | None:
        return cls(**fields) if fields else None


def reasoning_format(entry: Any, template_source: str, prompt: str) -> ReasoningFormat | None:
    """The markers of a prompt's output, from the entry's ``cot_*`` keys or the template; None: no reasoning."""
    if entry.get("cot_output"):
        end = str(entry.get("cot_end_tag") or THINK_END)
        return ReasoningFormat(str(entry.get("cot_start_tag") or ""), end, starts_inside=True, source="entry")
    tail = prompt.rstrip()
    if THINK_START in template_source and THINK_END in template_source:
        # A prefill that closed the block already (an empty <think></think>: no reasoning) leaves nothing to split.
        if tail.endswith(THINK_END):
            return None
        return ReasoningFormat(THINK_START, re.escape(THINK_END), starts_inside=tail.endswith(THINK_START))
    if "<|channel|>" in template_source and "analysis" in template_source:
        if tail.endswith("<|channel|>final<|message|>"):
            return None
        return ReasoningFormat(HARMONY_START, HARMONY_END, starts_inside=tail.endswith(HARMONY_START))
    return None


Kind = Literal["reasoning", "content"]


@dataclass
class ReasoningParser:
    """Splits a text, as it streams in, into reasoning and content (the answer)."""

    format: ReasoningFormat
    reasoning: str = ""
    content: str = ""
    _state: Literal["before", "reasoning", "answer"] = "before"
    _buffer: str = ""
    _pattern: Any = field(default=None, repr=False)
    _answer_started: bool = False

    def __post_init__(self) -> None:
        self._pattern = regex.compile(self.format.end, flags=regex.VERSION0)
        if self.format.starts_inside:
            self._state = "reasoning"

    @property
    def ended_reasoning(self) -> bool:
        return self._state == "answer"

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        """The pieces this text completes, each ``("reasoning", text)`` or ``("content", text)``."""
        self._buffer += text
        found: list[tuple[Kind, str]] = []
        while self._buffer and self._step(found):
            pass
        return self._record(found)

    def finish(self) -> list[tuple[Kind, str]]:
        """What is held back when the text ends: reasoning cut off stays reasoning, the content has none of it."""
        found: list[tuple[Kind, str]] = []
        if self._state == "reasoning":
            self._emit_reasoning(self._buffer, found)
        elif self._buffer:
            self._emit_content(self._buffer, found)
        self._buffer = ""
        return self._record(found)

    # --- states ---

    def _step(self, found: list[tuple[Kind, str]]) -> bool:
        """Move on as far as the buffer allows; False when more text is needed."""
        if self._state == "before":
            return self._before(found)
        if self._state == "reasoning":
            return self._in_reasoning(found)
        self._emit_content(self._buffer, found)
        self._buffer = ""
        return False

    def _before(self, found: list[tuple[Kind, str]]) -> bool:
        stripped = self._buffer.lstrip()
        if not stripped:
            return False  # only whitespace so far: it may come before the opening marker
        start = self.format.start
        if start and stripped.startswith(start):
            self._buffer = stripped[len(start) :]
            self._state = "reasoning"
            return True
        if start and start.startswith(stripped):
            return False  # could still be the opening marker
        ended = self._pattern.match(stripped, partial=True)
        if ended is not None and ended.partial:
            return False  # could still be the end marker, with no reasoning before it (harmony's final channel)
        if ended is not None:
            self._buffer = stripped[ended.end() :]
        self._state = "answer"  # no reasoning: everything is the answer
        return True

    def _in_reasoning(self, found: list[tuple[Kind, str]]) -> bool:
        start = self.format.start
        if start and not self.reasoning and not found:
            # Inside from the first token (cot_output, or a prompt that opened the block): an opening marker the
            # model writes anyway is dropped, as clemcore drops cot_start_tag.
            stripped = self._buffer.lstrip()
            if stripped.startswith(start):
                self._buffer = stripped[len(start) :]
            elif start.startswith(stripped):
                return False
        match = self._pattern.search(self._buffer, partial=True)
        if match is None:
            self._emit_reasoning(self._buffer, found)
            self._buffer = ""
            return False
        self._emit_reasoning(self._buffer[: match.start()], found)
        if match.partial:
            self._buffer = self._buffer[match.start() :]
            return False
        self._buffer = self._buffer[match.end() :]
        self._state = "answer"
        return True

    # --- output ---

    def _emit_reasoning(self, text: str, found: list[tuple[Kind, str]]) -> None:
        if text:
            found.append(("reasoning", text))

    def _emit_content(self, text: str, found: list[tuple[Kind, str]]) -> None:
        if not self._answer_started:
            text = text.lstrip()  # the answer starts at its first visible character, as clemcore strips it
            if not text:
                return
            self._answer_started = True
        found.append(("content", text))

    def _record(self, found: list[tuple[Kind, str]]) -> list[tuple[Kind, str]]:
        for kind, text in found:
            if kind == "reasoning":
                self.reasoning += text
            else:
                self.content += text
        return found


def split_reasoning(text: str, format: ReasoningFormat) -> tuple[str, str]:
    """A whole text's reasoning and answer."""
    parser = ReasoningParser(format)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content


def answer_grammar(grammar: str | None, format: ReasoningFormat | None, budget: int | None) -> str | None:
    """The grammar a prompt's generation follows: ``grammar`` as it is where the output has no reasoning, else
    held to the answer after it (``after_reasoning``), also where only a budget asks for one."""
    if format is None or (grammar is None and budget is None):
        return grammar
    return after_reasoning(grammar, format, budget)


def after_reasoning(grammar: str | None, format: ReasoningFormat, budget: int | None = None) -> str:
    """A grammar (llguidance's: lark text, or a serialized grammar such as a JSON Schema's) for the reasoning and
    then the answer: free text without the end marker, the marker, then ``grammar`` (None: free text). With a
    ``budget`` the reasoning ends after that many tokens: the marker is forced, and the answer follows. A prompt
    whose output starts outside the reasoning may also answer at once."""
    if grammar is None:
        answer: dict[str, Any] = {"name": "answer", "lark_grammar": "start: /(?s:.*)/\n"}
    elif grammar.lstrip().startswith("{"):
        subgrammars = json.loads(grammar)["grammars"]
        if len(subgrammars) != 1:
            return grammar  # grammars that refer to each other by position: left as they are
        answer = {**subgrammars[0], "name": "answer"}
    else:
        answer = {"name": "answer", "lark_grammar": grammar}
    end = format.end.replace("/", "\\/")
    opening = f"{json.dumps(format.start)} " if format.start and not format.starts_inside else ""
    first = _literal_prefix(format.end, 1)
    if budget is None or not first:
        # Free text up to the first end marker (a lazy lexeme: it ends there), then the answer.
        rules = f"reasoning[lazy]: /(?s:.*)(?:{end})/\n"
        body = "reasoning WS @answer"
    else:
        # With a budget the text and the marker are apart, so that the marker can be forced once the text has
        # spent it. llguidance's lexer does not step back, so the text never holds the marker's first character
        # ("<" for every marker known here).
        x = re.escape(first).replace("/", "\\/")
        rules = f"reasoning[max_tokens={budget}]: TEXT\nTEXT: /[^{x}]*/\nEND: /(?:{end})/\n"
        body = "reasoning END WS @answer"
    start = f"start: {opening}{body}" + (" | @answer" if opening else "")
    lark = f"{start}\n{rules}WS: /[ \\t\\r\\n]*/\n"
    return json.dumps({"grammars": [{"name": "reasoned", "lark_grammar": lark}, answer]})


def _literal_prefix(pattern: str, length: int) -> str:
    """The first characters a regular expression matches literally (escapes undone), up to ``length``."""
    found = ""
    at = 0
    while len(found) < length and at < len(pattern):
        char = pattern[at]
        if char == "\\" and at + 1 < len(pattern) and not pattern[at + 1].isalnum():
            found += pattern[at + 1]
            at += 2
        elif char.isalnum() or char in "<>!,;:=/ -_'\"&%#@~`":
            found += char
            at += 1
        else:
            break
    return found

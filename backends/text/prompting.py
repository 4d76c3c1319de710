"""Chat-template rendering shared by every backend.

Templates run in the same sandboxed Jinja2 environment transformers uses for
``apply_chat_template`` (trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, ``tojson``, ``strftime_now``), so a template from a
tokenizer config, a GGUF file or a registry entry renders the same way
whichever backend serves it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.errors import PromptRenderError
from backends.text.tools import CALL_CLOSE, CALL_OPEN, tool_prompt

logger = logging.getLogger(__name__)

# Used when an entry has neither a premade nor a custom template. clembench
# warns that this is "highly discouraged"; we render a plain, readable
# transcript so that even such a model gets a usable prompt.
GENERIC_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateRaisedError(Exception):
    """Raised by a template's own ``raise_exception(...)``."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaisedError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates want the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template; raises ``jinja2.TemplateSyntaxError`` when it is not valid Jinja2."""
    return template_environment().from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "custom") -> None:
        self.source = source
        self.origin = origin  # "premade", "custom" or "generic": shown to operators, logged on load
        self.warning: str | None = None  # what an operator should know about this choice
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = compile_template(source)

    @property
    def takes_tools(self) -> bool:
        """The template renders a ``tools`` variable itself (HF's convention for tool definitions)."""
        return re.search(r"\btools\b", self.source) is not None

    @property
    def takes_tool_calls(self) -> bool:
        """The template renders assistants' ``tool_calls`` and ``tool`` messages itself."""
        return "tool_calls" in self.source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> str:
        variables = dict(extra or {})
        if tools and self.takes_tools:
            variables["tools"] = [dict(tool) for tool in tools]
        elif tools:
            messages = with_tool_prompt(messages, tool_prompt(tools))
        variables.update(
            messages=template_messages(messages, self.takes_tool_calls),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return self._template.render(**variables)
        except TemplateRaisedError as exc:
            raise PromptRenderError(f"the model's chat template rejected these messages: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise PromptRenderError(f"the model's chat template failed to render: {exc}") from exc


def with_tool_prompt(messages: Sequence[Mapping[str, Any]], prompt: str) -> list[Mapping[str, Any]]:
    """The default tool prompt at the end of the system message, or as a system message of its own."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{prompt}".lstrip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def template_messages(messages: Sequence[Mapping[str, Any]], takes_tool_calls: bool) -> list[dict[str, Any]]:
    """Messages as the template renders them. A template that renders tool calls gets them with their arguments
    as objects (HF's convention); for one that does not, calls are written into the assistant's text in the
    ``<tool_call>`` format, and a tool's result becomes a user turn in ``<tool_response>`` tags."""
    converted = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if takes_tool_calls:
            if calls:
                message["tool_calls"] = [
                    {**call, "function": {**call["function"], "arguments": _arguments(call["function"])}}
                    for call in calls
                ]
        elif calls:
            written = "\n".join(
                f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c['function'])})}"
                f"\n{CALL_CLOSE}"
                for c in calls
            )
            message["content"] = f"{message.get('content') or ''}\n{written}".lstrip("\n")
        elif message.get("role") == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        converted.append(message)
    return converted


def _arguments(function: Mapping[str, Any]) -> Any:
    """A call's arguments as an object when they are JSON (they should be), else as the text sent."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def ensure_single_bos(token_ids: list[int], bos_id: int | None, add_bos: bool) -> list[int]:
    """Exactly one leading BOS when the model wants one or the template rendered one; never two.

    Templates usually render ``bos_token`` themselves, and tokenisers may add
    another; both backends tokenise without special tokens and call this.
    """
    if bos_id is None or bos_id < 0:
        return token_ids
    if add_bos and token_ids[:1] != [bos_id]:
        token_ids = [bos_id, *token_ids]
    while token_ids[:2] == [bos_id, bos_id]:
        token_ids = token_ids[1:]
    return token_ids


def choose_chat_template(
    spec: Mapping[str, Any], premade: str | None, *, bos_token: str, eos_token: str
) -> ChatTemplate:
    """Pick the template a registry entry asks for, as clembench does.

    ``premade_chat_template: true`` uses the model's own template; otherwise
    ``custom_chat_template``; otherwise the generic fallback, with a warning.
    """
    name = spec.get("model_name", "?")
    missing = "premade_chat_template is false and there is no custom_chat_template"
    if spec.get("premade_chat_template"):
        if premade:
            return ChatTemplate(premade, bos_token=bos_token, eos_token=eos_token, origin="premade")
        missing = "premade_chat_template is true, but the model ships no chat template"
    custom = spec.get("custom_chat_template")
    if custom:
        return ChatTemplate(custom, bos_token=bos_token, eos_token=eos_token, origin="custom")
    template = ChatTemplate(GENERIC_CHAT_TEMPLATE, bos_token=bos_token, eos_token=eos_token, origin="generic")
    template.warning = f"{missing}: using the generic fallback template, which is likely to hurt this model's output"
    logger.warning("%s: %s", name, template.warning)
    return template

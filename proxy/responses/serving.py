"""``/v1/responses``: the Responses API on the serving path of chat completions (``proxy.serving``).

A request becomes chat messages (its ``instructions``, the conversation its ``previous_response_id`` stored,
its input items), the same tools and grammars (``proxy.constraints``) and the same generation; its answer is
made of output items: a message with the text, and a ``function_call`` for each call the model wrote. One
``OutputBuilder`` makes the items from the text as it streams, with the typed events OpenAI sends for them,
so that a streamed answer and a whole one are made of the same pieces.

Because a continued conversation is rendered from the same items, its earlier turns are the same tokens as
before, and the engine's prefix cache finds them (``usage.input_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from msgspec import UNSET

from backends import BackendError, GenerationParams, Model, PreparedPrompt
from backends.model import TokenLogprob
from backends.text.reasoning import ReasoningParser
from backends.text.tools import CallArguments, CallStart, Content, Piece, ToolCallParser
from proxy.chat import logprob_structs
from proxy.constraints import Function, ToolChoice, constraint
from proxy.errors import APIError
from proxy.limits import NO_LIMITS, RequestLimits
from proxy.manager import ModelManager
from proxy.protocol import encode
from proxy.responses.protocol import (
    ContentPart,
    ContentPartEvent,
    CreateResponse,
    FormatJSONObject,
    FormatJSONSchema,
    FormatText,
    FunctionCall,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    LogProb,
    NamedFunctionChoice,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseUsage,
    TextConfig,
    ToolEcho,
    TopLogProb,
)
from proxy.responses.store import ResponseStore, StoredResponse
from proxy.serving import GeneratedChoice, OpenAIServing, ResponseHead, generation_params, usage_of

LOGPROBS_INCLUDE = "message.output_text.logprobs"
METADATA_KEYS, METADATA_KEY_LENGTH, METADATA_VALUE_LENGTH = 16, 64, 512

Messages = list[dict[str, Any]]
ItemDict = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def missing(param: str, what: str) -> APIError:
    return APIError(400, f"{what} needs '{param.rsplit('.', 1)[-1]}'", param=param, code="missing_required_parameter")


# --- the request ---------------------------------------------------------------------------------------------


def refuse_unsupported(request: CreateResponse) -> None:
    """A 400 for every field this server cannot honour, rather than a response that silently ignores it."""
    if request.reasoning is not None and request.reasoning.summary is not None:
        raise unsupported(
            "reasoning.summary", "reasoning summaries are not supported: the reasoning comes as the model wrote it"
        )
    refused = {
        "background": (request.background is True, "background responses are not supported; stream instead"),
        "conversation": (request.conversation is not None, "conversations are not supported; use previous_response_id"),
        "prompt": (request.prompt is not None, "stored prompt templates are not supported; send the input itself"),
        "context_management": (request.context_management is not None, "context_management is not supported"),
        "truncation": (
            request.truncation == "auto",
            "truncation 'auto' is not supported: a conversation longer than the context is a 400",
        ),
        "service_tier": (
            request.service_tier not in (None, "auto", "default"),
            f"service_tier '{request.service_tier}' is not offered here; leave it out, or send 'auto' or 'default'",
        ),
    }
    for param, (used, message) in refused.items():
        if used:
            raise unsupported(param, message)
    for index, value in enumerate(request.include or []):
        if value != LOGPROBS_INCLUDE:
            raise unsupported(f"include[{index}]", f"include '{value}' is not supported; only '{LOGPROBS_INCLUDE}' is")
    if request.text is not None and request.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "text.verbosity other than 'medium' is not supported")
    metadata = request.metadata or {}
    if len(metadata) > METADATA_KEYS or any(
        len(k) > METADATA_KEY_LENGTH or len(v) > METADATA_VALUE_LENGTH for k, v in metadata.items()
    ):
        raise APIError(
            400,
            f"metadata holds at most {METADATA_KEYS} pairs, keys of at most {METADATA_KEY_LENGTH} characters and "
            f"values of at most {METADATA_VALUE_LENGTH}",
            param="metadata",
            code="invalid_value",
        )


def part_texts(parts: str | list[ContentPart], param: str, allowed: tuple[str, ...]) -> str:
    """The text of a content list (or a plain string); a part of another kind (an image, a file, audio) is a 400."""
    if isinstance(parts, str):
        return parts
    texts = []
    for index, part in enumerate(parts):
        text = part.refusal if part.type == "refusal" else part.text
        if part.type not in allowed or text is None:
            raise APIError(
                400,
                f"Content part type '{part.type}' is not supported here; only {' and '.join(allowed)} parts with "
                "their text are (the models served here read text)",
                param=f"{param}[{index}]",
                code="unsupported_content_type",
            )
        texts.append(text)
    return "".join(texts)


def output_message(text: str, item_id: str | None = None) -> ItemDict:
    """An assistant message of the input, as ``input_items`` lists it (OpenAI's output message)."""
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def input_message(role: str, text: str, item_id: str | None = None) -> ItemDict:
    """A user, system or developer message of the input, as ``input_items`` lists it."""
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [{"type": "input_text", "text": text}],
    }


def input_items(given: str | list[InputItem] | None) -> list[ItemDict]:
    """The request's input as the items ``input_items`` lists and the store keeps, each with an id."""
    if given is None or given == [] or given == "":
        raise APIError(
            400,
            "The request needs 'input': a string or a list of items",
            param="input",
            code="missing_required_parameter",
        )
    if isinstance(given, str):
        return [input_message("user", given)]
    items = []
    for index, item in enumerate(given):
        where = f"input[{index}]"
        if item.type == "message":
            if item.role is None:
                raise missing(f"{where}.role", "A message")
            if item.content is None:
                raise missing(f"{where}.content", "A message")
            if item.role == "assistant":
                text = part_texts(item.content, f"{where}.content", ("output_text", "input_text", "refusal"))
                items.append(output_message(text, item.id))
            else:
                text = part_texts(item.content, f"{where}.content", ("input_text",))
                items.append(input_message(item.role, text, item.id))
        elif item.type == "function_call":
            for key in ("call_id", "name", "arguments"):
                if getattr(item, key) is None:
                    raise missing(f"{where}.{key}", "A function_call item")
            items.append(
                {
                    "id": item.id or new_id("fc"),
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": "completed",
                }
            )
        elif item.type == "function_call_output":
            if item.call_id is None:
                raise missing(f"{where}.call_id", "A function_call_output item")
            if item.output is None:
                raise missing(f"{where}.output", "A function_call_output item")
            output = part_texts(item.output, f"{where}.output", ("input_text", "output_text"))
            items.append(
                {
                    "id": item.id or new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output,
                    "status": "completed",
                }
            )
        elif item.type == "reasoning":  # an earlier answer's reasoning, given back: its template may render it
            content = item.content if isinstance(item.content, list) else []
            items.append(
                {
                    "id": item.id or new_id("rs"),
                    "type": "reasoning",
                    "status": "completed",
                    "content": [{"type": "reasoning_text", "text": part.text or ""} for part in content],
                    "summary": [],
                }
            )
        elif item.type == "item_reference":
            raise unsupported(
                f"{where}.type",
                "Item references are not supported; send the item itself, or "
                "continue a stored response with previous_response_id",
            )
        else:
            raise unsupported(
                f"{where}.type",
                f"Input items of type '{item.type}' are not supported here; "
                "messages, reasoning, function_call and function_call_output items are",
            )
    return items


def chat_messages(instructions: str | None, earlier: list[ItemDict], given: list[ItemDict]) -> Messages:
    """Items as chat messages, the shape chat templates take: an assistant's text and the calls that follow it
    make one assistant message, a call's output a tool message (``proxy.chat.message_dicts`` has the same)."""
    messages: Messages = [{"role": "system", "content": instructions}] if instructions else []
    calls_made: set[str] = set()
    places = [None] * len(earlier) + [f"input[{index}]" for index in range(len(given))]
    last_was_assistant = False
    reasoning = ""  # of the assistant message that follows it
    for where, item in zip(places, [*earlier, *given], strict=True):
        kind = item["type"]
        if kind == "reasoning":
            reasoning += "".join(part.get("text", "") for part in item.get("content", []))
            continue
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            message = {"role": role, "content": "".join(part["text"] for part in item["content"])}
            if role == "assistant" and reasoning:
                message["reasoning_content"] = message["thinking"] = reasoning
            reasoning = ""
            messages.append(message)
            last_was_assistant = role == "assistant"
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if not last_was_assistant:
                messages.append({"role": "assistant", "content": ""})
                last_was_assistant = True
            messages[-1].setdefault("tool_calls", []).append(call)
            calls_made.add(item["call_id"])
        else:  # function_call_output
            if item["call_id"] not in calls_made:
                raise APIError(
                    400,
                    f"call_id '{item['call_id']}' answers no function_call of the input or of the conversation "
                    "previous_response_id continues",
                    param=f"{where}.call_id" if where else "previous_response_id",
                    code="invalid_value",
                )
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            last_was_assistant = False
    return messages


def answer_format(
    request: CreateResponse,
) -> tuple[FormatText | FormatJSONObject | FormatJSONSchema, dict[str, Any] | None]:
    """``text.format`` as the response repeats it, and the JSON Schema the answer follows (None: free text)."""
    given = request.text.format if request.text is not None else None
    if given is None or given.type == "text":
        return FormatText(), None
    if given.type == "json_object":
        return FormatJSONObject(), {"type": "object"}
    if given.name is None:
        raise missing("text.format.name", "A json_schema format")
    if given.schema is None:
        raise missing("text.format.schema", "A json_schema format")
    echo = FormatJSONSchema(name=given.name, schema=given.schema, strict=given.strict)
    if given.description is not None:
        echo.description = given.description
    return echo, given.schema


def tool_settings(request: CreateResponse) -> tuple[list[Function], ToolChoice]:
    functions = []
    for index, tool in enumerate(request.tools or []):
        if tool.type != "function":
            raise unsupported(
                f"tools[{index}].type",
                f"Tools of type '{tool.type}' are not supported: built-in tools run on OpenAI's side, and this "
                "server has none; function tools are supported",
            )
        if tool.name is None:
            raise missing(f"tools[{index}].name", "A function tool")
        functions.append(Function(tool.name, tool.description, tool.parameters, f"tools[{index}].parameters"))
    choice = request.tool_choice
    if choice is None or isinstance(choice, str):
        return functions, ToolChoice(choice)
    if choice.type != "function":
        raise unsupported(
            "tool_choice.type",
            f"tool_choice of type '{choice.type}' is not supported; "
            "'none', 'auto', 'required' or a function ({\"type\": \"function\", \"name\": ...}) are",
        )
    if choice.name is None:
        raise missing("tool_choice.name", "A function tool_choice")
    return functions, ToolChoice("function", choice.name, "tool_choice.name")


# --- the answer ----------------------------------------------------------------------------------------------


def wire_logprobs(entries: list[TokenLogprob]) -> list[LogProb]:
    return logprob_structs(entries, LogProb, TopLogProb)


@dataclass
class OutputBuilder:
    """The output items of one answer, from its text as it streams, with the events that build them: a message
    item opens at the first text and closes before a call; a call is an item of its own."""

    parse_calls: bool
    items: list[OutputItem] = field(default_factory=list)
    reasoner: ReasoningParser | None = None  # where the answer has reasoning before it: a reasoning item first
    _parser: ToolCallParser | None = None
    _open: OutputItem | None = None
    _logprobs: list[LogProb] = field(default_factory=list)  # of the open message, all of them
    _pending: list[LogProb] = field(default_factory=list)  # not yet sent with a delta

    def __post_init__(self) -> None:
        self._parser = ToolCallParser() if self.parse_calls else None

    def feed(self, delta: str, logprobs: list[LogProb]) -> list[Any]:
        self._pending += logprobs
        if self.reasoner is None:
            return self._answer(delta)
        return self._reasoned(self.reasoner.feed(delta))

    def _answer(self, delta: str) -> list[Any]:
        pieces: list[Piece] = (
            self._parser.feed(delta) if self._parser is not None else [Content(delta)] if delta else []
        )
        return self._events(pieces)

    def _reasoned(self, pieces: Sequence[tuple[str, str]]) -> list[Any]:
        events: list[Any] = []
        for kind, text in pieces:
            if kind == "content":
                events += self._answer(text)
                continue
            if not isinstance(self._open, ReasoningItem):
                events += self._close("completed")
                item = ReasoningItem(id=new_id("rs"), status="in_progress", content=[ReasoningText(text="")])
                self._start(item)
                events.append(OutputItemEvent("response.output_item.added", self._index(), _copy(item, content=[])))
            reasoning = self._open
            assert isinstance(reasoning, ReasoningItem)
            reasoning.content[0].text += text
            events.append(ReasoningTextDeltaEvent(reasoning.id, self._index(), 0, text))
        return events

    def finish(self, incomplete: bool) -> list[Any]:
        """The events that end the answer; the last item is ``incomplete`` when the answer was cut short."""
        events = self._reasoned(self.reasoner.finish()) if self.reasoner is not None else []
        events += self._events(self._parser.finish() if self._parser is not None else [])
        if not any(isinstance(item, OutputMessage | FunctionCall) for item in self.items):
            events += self._close("incomplete" if incomplete else "completed")
            events += self._open_message()  # the answer is a message, even an empty one
        return events + self._close("incomplete" if incomplete else "completed")

    def _events(self, pieces: list[Piece]) -> list[Any]:
        events: list[Any] = []
        for piece in pieces:
            if isinstance(piece, Content):
                if not isinstance(self._open, OutputMessage):
                    events += self._close("completed") + self._open_message()
                message = self._open
                assert isinstance(message, OutputMessage)
                message.content[0].text += piece.text
                sent, self._pending = self._pending, []
                self._logprobs += sent
                events.append(OutputTextDeltaEvent(message.id, self._index(), 0, piece.text, sent))
            elif isinstance(piece, CallStart):
                events += self._close("completed")
                call = FunctionCall(
                    id=new_id("fc"), call_id=piece.id, name=piece.name, arguments="", status="in_progress"
                )
                self._start(call)
                events.append(OutputItemEvent("response.output_item.added", self._index(), _copy(call)))
            elif isinstance(piece, CallArguments):
                open_call = self._open
                assert isinstance(open_call, FunctionCall)
                open_call.arguments += piece.text
                events.append(FunctionCallArgumentsDeltaEvent(open_call.id, self._index(), piece.text))
        return events

    def _start(self, item: OutputItem) -> None:
        self.items.append(item)
        self._open = item

    def _index(self) -> int:
        return len(self.items) - 1

    def _open_message(self) -> list[Any]:
        message = OutputMessage(id=new_id("msg"), status="in_progress", content=[OutputText(text="")])
        self._start(message)
        self._logprobs = []
        return [
            OutputItemEvent("response.output_item.added", self._index(), _copy(message, content=[])),
            ContentPartEvent("response.content_part.added", message.id, self._index(), 0, OutputText(text="")),
        ]

    def _close(self, status: Literal["completed", "incomplete"]) -> list[Any]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        index = self.items.index(item)
        if isinstance(item, FunctionCall):
            return [
                FunctionCallArgumentsDoneEvent(item.id, index, item.name, item.arguments),
                OutputItemEvent("response.output_item.done", index, _copy(item)),
            ]
        if isinstance(item, ReasoningItem):
            return [
                ReasoningTextDoneEvent(item.id, index, 0, item.content[0].text),
                OutputItemEvent("response.output_item.done", index, _copy(item)),
            ]
        part = item.content[0]
        part.logprobs = self._logprobs + self._pending
        self._pending = []
        return [
            OutputTextDoneEvent(item.id, index, 0, part.text, part.logprobs),
            ContentPartEvent("response.content_part.done", item.id, index, 0, _copy(part)),
            OutputItemEvent("response.output_item.done", index, _copy(item)),
        ]


def _copy(value: Any, **changes: Any) -> Any:
    """A snapshot for an event: the builder goes on changing its items."""
    copied = msgspec.convert(msgspec.to_builtins(value), type=type(value))
    return msgspec.structs.replace(copied, **changes) if changes else copied


@dataclass
class ResponseCall:
    """One ``/v1/responses`` request on its way through the serving path: the request, who made it, the
    conversation it continues, its input items, and its answer as it is made."""

    request: CreateResponse
    owner: str
    earlier: list[ItemDict]  # the conversation of previous_response_id: its items, oldest first
    input: list[ItemDict]
    temperature: float = 1.0  # as generated: the request's, else the registry entry's, else OpenAI's default
    top_p: float = 1.0
    output: OutputBuilder | None = None
    response: Response | None = None  # the answer once it is whole

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def n(self) -> int | None:
        return None  # one answer per request


class ResponsesService(OpenAIServing[ResponseCall, Messages, Response]):
    id_prefix = "resp_"
    done_event = b""  # the Responses API ends with its last typed event, without [DONE]

    def __init__(
        self, manager: ModelManager, store: ResponseStore, limits: RequestLimits = NO_LIMITS, metrics: Any = None
    ) -> None:
        super().__init__(manager, limits, metrics)
        self.store = store

    async def call(self, request: CreateResponse, owner: str) -> ResponseCall:
        """The request checked and its conversation read back: every 400 and 404 comes before a model loads."""
        refuse_unsupported(request)
        given = input_items(request.input)
        earlier: list[ItemDict] = []
        if request.previous_response_id is not None:
            stored = await asyncio.to_thread(self.store.get, request.previous_response_id, owner)
            if stored is None:
                raise APIError(
                    404,
                    f"No stored response '{request.previous_response_id}' (it was never stored, was deleted or "
                    "expired, or belongs to another API key)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            earlier = stored.conversation
        return ResponseCall(request, owner, earlier, given)

    # --- the request ---------------------------------------------------------------------------------------

    def parameters(self, call: ResponseCall, spec: Mapping[str, Any]) -> tuple[GenerationParams, Messages]:
        request = call.request
        messages = chat_messages(request.instructions, call.earlier, call.input)
        self.limits.check_messages(len(messages))
        _, schema = answer_format(request)
        functions, choice = tool_settings(request)
        tools, grammar = constraint(
            functions,
            choice,
            parallel=request.parallel_tool_calls is not False,
            schema=schema,
            schema_param="text.format.schema",
        )
        logprobs = LOGPROBS_INCLUDE in (request.include or []) or bool(request.top_logprobs)
        params = generation_params(
            request,
            spec,
            max_tokens=self.limits.completion_tokens(request.max_output_tokens, "max_output_tokens"),
            logprobs=logprobs,
            top_logprobs=request.top_logprobs or 0,
            reasoning_effort=request.reasoning.effort if request.reasoning is not None else None,
        )
        call.temperature, call.top_p = params.temperature, params.top_p
        return dataclasses.replace(params, tools=tools, grammar=grammar), messages

    def prompts(self, model: Model, inputs: Messages, params: GenerationParams) -> list[PreparedPrompt]:
        try:
            return [model.prepare(inputs, params)]
        except BackendError as exc:
            if exc.param == "messages":  # the Responses API has no messages: they were made from the input
                exc.param = "input"
            raise

    # --- the answer ----------------------------------------------------------------------------------------

    @staticmethod
    def _parses_calls(call: ResponseCall) -> bool:
        return bool(call.request.tools) and call.request.tool_choice != "none"

    def _snapshot(self, call: ResponseCall, head: ResponseHead, status: Any) -> Response:
        """The response as it stands: its settings, the items so far."""
        request = call.request
        text_format, _ = answer_format(request)
        choice = request.tool_choice
        return Response(
            id=head.id,
            created_at=head.created,
            model=head.model,
            status=status,
            output=[_copy(item) for item in call.output.items] if call.output is not None else [],
            instructions=request.instructions,
            tools=[
                ToolEcho(
                    name=tool.name or "",
                    parameters=tool.parameters,
                    strict=True if tool.strict is None else tool.strict,  # calls always follow their schema here
                    description=tool.description,
                )
                for tool in request.tools or []
            ],
            tool_choice=(choice or "auto")
            if choice is None or isinstance(choice, str)
            else NamedFunctionChoice(name=choice.name or ""),
            parallel_tool_calls=request.parallel_tool_calls is not False,
            temperature=call.temperature,
            top_p=call.top_p,
            metadata=dict(request.metadata or {}),
            text=TextConfig(format=text_format),
            max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id,
            store=request.store,
            top_logprobs=request.top_logprobs or 0,
            user=UNSET if request.user is None else request.user,
            reasoning=request.reasoning,
            max_tool_calls=request.max_tool_calls,
            safety_identifier=request.safety_identifier,
            prompt_cache_key=request.prompt_cache_key,
        )

    def open_events(self, call: ResponseCall, head: ResponseHead) -> list[Any]:
        call.output = OutputBuilder(self._parses_calls(call))
        return [
            ResponseEvent("response.created", self._snapshot(call, head, "in_progress")),
            ResponseEvent("response.in_progress", self._snapshot(call, head, "in_progress")),
        ]

    def start_events(self, call: ResponseCall, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        assert call.output is not None
        if choice.prompt.reasoning is not None:
            call.output.reasoner = ReasoningParser(choice.prompt.reasoning)
        return []  # an item opens with its first text or call

    def delta_events(self, call: ResponseCall, head: ResponseHead, choice: GeneratedChoice, delta: str) -> list[Any]:
        assert call.output is not None
        fresh = wire_logprobs(choice.fresh_logprobs()) if choice.params.logprobs else []
        return call.output.feed(delta, fresh)

    def end_events(self, call: ResponseCall, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        assert call.output is not None
        fresh = wire_logprobs(choice.fresh_logprobs()) if choice.params.logprobs else []
        return call.output.feed("", fresh) + call.output.finish(choice.outcome.finish_reason == "length")

    async def finished(self, call: ResponseCall, head: ResponseHead, choices: list[GeneratedChoice]) -> None:
        (choice,) = choices
        if call.output is None:  # a whole answer: its items from its text at once, the stream's events unsent
            call.output = OutputBuilder(self._parses_calls(call))
            self.start_events(call, head, choice)
            self.delta_events(call, head, choice, choice.text)
            self.end_events(call, head, choice)
        incomplete = choice.outcome.finish_reason == "length"
        response = self._snapshot(call, head, "incomplete" if incomplete else "completed")
        usage = usage_of(choices)
        response.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        )
        if incomplete:
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        else:
            response.completed_at = int(time.time())
        call.response = response
        if call.request.store:
            await asyncio.to_thread(self.store.save, self._stored(call, response))

    @staticmethod
    def _stored(call: ResponseCall, response: Response) -> StoredResponse:
        answer = msgspec.to_builtins(response)
        return StoredResponse(
            id=response.id,
            owner=call.owner,
            created_at=time.time(),
            response=answer,
            input_items=call.input,
            conversation=[*call.earlier, *call.input, *answer["output"]],
        )

    def response(self, call: ResponseCall, head: ResponseHead, choices: list[GeneratedChoice]) -> Response:
        assert call.response is not None
        return call.response

    def close_events(self, call: ResponseCall, head: ResponseHead, choices: list[GeneratedChoice]) -> list[Any]:
        assert call.response is not None
        kind = "response.incomplete" if call.response.status == "incomplete" else "response.completed"
        return [ResponseEvent(kind, call.response)]

    def failure_events(
        self, call: ResponseCall, head: ResponseHead, choices: list[GeneratedChoice], error: APIError
    ) -> list[Any]:
        # A stream that broke while it waited for its turn has sent nothing yet: clients expect it created first.
        opened = self.open_events(call, head) if call.output is None else []
        failed = self._snapshot(call, head, "failed")
        failed.error = ResponseError(code="server_error", message=error.message)
        return [*opened, ResponseEvent("response.failed", failed)]

    def frame(self, event: Any, sequence: int) -> bytes:
        event.sequence_number = sequence
        kind: str = event.type
        return b"event: " + kind.encode() + b"\ndata: " + encode(event) + b"\n\n"

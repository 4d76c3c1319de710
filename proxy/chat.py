"""``/v1/chat/completions``: the request and response mapping; ``proxy.serving`` does the rest."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from backends import GenerationParams, Model, PreparedPrompt
from backends.model import TokenLogprob as BackendTokenLogprob
from backends.text.reasoning import ReasoningFormat, ReasoningParser, split_reasoning
from backends.text.tools import CallStart, Content, Piece, ToolCallParser
from proxy.constraints import Function, ToolChoice, constraint
from proxy.errors import APIError
from proxy.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from proxy.serving import (
    SYSTEM_FINGERPRINT,
    GeneratedChoice,
    OpenAIServing,
    ResponseHead,
    generation_params,
    include_usage,
    usage_of,
)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role, a plain string content, and an assistant's tool calls and a
    tool result's call id (``backends.text.prompting.template_messages`` renders those for templates that can't)."""
    converted = []
    calls_made: set[str] = set()
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"Content part type '{part.type}' is not supported; only 'text' parts are",
                        param=f"messages[{index}].content[{part_index}].type",
                        code="unsupported_content_type",
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if message.role == "developer" else message.role  # templates know "system", not "developer"
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        reasoning = message.reasoning_content or message.reasoning
        if reasoning and role == "assistant":
            # Templates that render earlier reasoning read it as reasoning_content (Qwen3) or thinking (gpt-oss);
            # most drop it from every turn but the last, as they were trained.
            entry["reasoning_content"] = entry["thinking"] = reasoning
        if message.tool_calls:
            if role != "assistant":
                raise _invalid(
                    f"Only assistant messages can have tool_calls, not a {message.role} message", index, "tool_calls"
                )
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in message.tool_calls
            ]
            calls_made.update(call.id for call in message.tool_calls)
        if role == "tool":
            if not message.tool_call_id:
                raise _invalid(
                    "A tool message needs tool_call_id: the id of the call it answers",
                    index,
                    "tool_call_id",
                    code="missing_required_parameter",
                )
            if message.tool_call_id not in calls_made:
                answers = f"tool_call_id '{message.tool_call_id}' answers no tool call of an earlier assistant message"
                raise _invalid(answers, index, "tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        elif message.tool_call_id is not None:
            raise _invalid(
                f"Only tool messages have a tool_call_id, not a {message.role} message", index, "tool_call_id"
            )
        converted.append(entry)
    return converted


def _invalid(message: str, index: int, field: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=f"messages[{index}].{field}", code=code)


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """A 400 for every field we cannot honour, rather than a response that silently ignores it."""
    unsupported = {
        "functions": bool(request.functions),
        "function_call": request.function_call not in (None, "none"),
        "logit_bias": bool(request.logit_bias),
        "audio": request.audio is not None,
        "modalities": request.modalities not in (None, ["text"]),
        "prediction": request.prediction is not None,
    }
    hints = {"functions": " (use tools)", "function_call": " (use tool_choice)"}
    for param, used in unsupported.items():
        if used:
            raise APIError(
                400,
                f"'{param}' is not supported by this server{hints.get(param, '')}",
                param=param,
                code="unsupported_parameter",
            )


def split_format(request: ChatCompletionRequest, choice: GeneratedChoice) -> ReasoningFormat | None:
    """How the choice's reasoning is told apart from its answer, where its output has reasoning and the request
    does not want the raw text (``reasoning_format: "none"``)."""
    return None if request.reasoning_format == "none" else choice.prompt.reasoning


def reasoning_parser(request: ChatCompletionRequest, choice: GeneratedChoice) -> ReasoningParser | None:
    """A reader of a streamed choice's reasoning before its answer, where it is split (``split_format``)."""
    found = split_format(request, choice)
    return ReasoningParser(found) if found is not None else None


def calls_tools(request: ChatCompletionRequest) -> bool:
    """Whether the answer may hold tool calls, parsed out of the model's text."""
    return bool(request.tools) and request.tool_choice != "none"


def answer_schema(request: ChatCompletionRequest) -> tuple[dict[str, Any] | None, str]:
    """The JSON Schema ``response_format`` asks the answer to follow (None: free text), and its field's name."""
    response_format = request.response_format
    if isinstance(response_format, ResponseFormatJSONObject):
        return {"type": "object"}, "response_format"
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        return (schema if schema is not None else {"type": "object"}), "response_format.json_schema.schema"
    return None, "response_format"


def constraint_of(request: ChatCompletionRequest) -> tuple[tuple[dict[str, Any], ...], str | None]:
    """The tools the prompt shows and the grammar the answer must match (``proxy.constraints``)."""
    schema, schema_param = answer_schema(request)
    functions = [
        Function(
            tool.function.name, tool.function.description, tool.function.parameters, f"tools[{i}].function.parameters"
        )
        for i, tool in enumerate(request.tools or [])
    ]
    if isinstance(request.tool_choice, NamedToolChoice):
        choice = ToolChoice("function", request.tool_choice.function.name, "tool_choice.function.name")
    else:
        choice = ToolChoice(request.tool_choice)
    parallel = request.parallel_tool_calls is not False
    return constraint(functions, choice, parallel=parallel, schema=schema, schema_param=schema_param)


def logprob_structs(entries: list[BackendTokenLogprob], token: Any, top: Any) -> list[Any]:
    """Log probabilities as a wire type of either API (``token``, ``top``: the structs of a token and of one of
    its alternatives, which both name ``token``, ``logprob``, ``bytes``)."""
    return [
        token(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.bytes),
            top_logprobs=[top(token=t, logprob=lp, bytes=list(b)) for t, lp, b in entry.top],
        )
        for entry in entries
    ]


def wire_logprobs(entries: list[BackendTokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=logprob_structs(entries, TokenLogprob, TopLogprob))


Messages = list[dict[str, Any]]


class ChatCompletionService(OpenAIServing[ChatCompletionRequest, Messages, ChatCompletion]):
    id_prefix = "chatcmpl-"

    def parameters(self, request: ChatCompletionRequest, spec: Mapping[str, Any]) -> tuple[GenerationParams, Messages]:
        refuse_unsupported(request)
        self.limits.check_messages(len(request.messages))
        messages = message_dicts(request.messages)
        tools, grammar = constraint_of(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        if request.max_completion_tokens is not None:
            max_tokens = self.limits.completion_tokens(request.max_completion_tokens, "max_completion_tokens")
        else:
            max_tokens = self.limits.completion_tokens(request.max_tokens, "max_tokens")
        params = generation_params(
            request,
            spec,
            max_tokens=max_tokens,
            logprobs=bool(request.logprobs),
            top_logprobs=request.top_logprobs or 0,
            template_kwargs=request.chat_template_kwargs,
            reasoning_effort=request.reasoning_effort,
            reasoning_budget=request.reasoning_budget
            if request.reasoning_budget is not None
            else request.thinking_token_budget,
        )
        return dataclasses.replace(params, tools=tools, grammar=grammar), messages

    def prompts(self, model: Model, inputs: Messages, params: GenerationParams) -> list[PreparedPrompt]:
        return [model.prepare(inputs, params)]

    def response(
        self, request: ChatCompletionRequest, head: ResponseHead, choices: list[GeneratedChoice]
    ) -> ChatCompletion:
        return ChatCompletion(
            id=head.id,
            created=head.created,
            model=head.model,
            choices=[self._choice(request, choice) for choice in choices],
            usage=usage_of(choices),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    def _choice(self, request: ChatCompletionRequest, choice: GeneratedChoice) -> Choice:
        message = ChatCompletionMessage(content=choice.text)
        answer = choice.text
        if (found := split_format(request, choice)) is not None:
            reasoning, answer = split_reasoning(choice.text, found)
            message.content, message.reasoning_content, message.reasoning = answer, reasoning, reasoning
        if calls_tools(request):
            parser = ToolCallParser()
            parser.feed(answer)
            parser.finish()
            message.content = parser.content
            if parser.calls:
                message.tool_calls = [
                    ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                    for call in parser.calls
                ]
            choice.parser = parser
        return Choice(
            index=choice.index,
            message=message,
            finish_reason=self._finish_reason(choice),
            logprobs=wire_logprobs(choice.outcome.logprobs) if choice.params.logprobs else None,
        )

    @staticmethod
    def _finish_reason(choice: GeneratedChoice) -> str:
        """OpenAI's: "tool_calls" when the model called tools and stopped by itself."""
        called = choice.parser is not None and choice.parser.calls
        return "tool_calls" if called and choice.outcome.finish_reason == "stop" else choice.outcome.finish_reason

    @staticmethod
    def _chunk(head: ResponseHead, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(
            id=head.id, created=head.created, model=head.model, choices=choices, system_fingerprint=SYSTEM_FINGERPRINT
        )
        if usage is not None:
            chunk.usage = usage
        return chunk

    @staticmethod
    def _logprobs(choice: GeneratedChoice) -> ChoiceLogprobs | None:
        return wire_logprobs(choice.fresh_logprobs()) if choice.params.logprobs else None

    def start_events(self, request: ChatCompletionRequest, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        if calls_tools(request):
            choice.parser = ToolCallParser()
        choice.reasoner = reasoning_parser(request, choice)
        return [self._chunk(head, [ChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""))])]

    def delta_events(
        self, request: ChatCompletionRequest, head: ResponseHead, choice: GeneratedChoice, delta: str
    ) -> list[Any]:
        if choice.reasoner is not None:
            return self._reasoned_chunks(head, choice, choice.reasoner.feed(delta))
        return self._answer_chunks(head, choice, delta)

    def _reasoned_chunks(self, head: ResponseHead, choice: GeneratedChoice, pieces: list[tuple[str, str]]) -> list[Any]:
        """Reasoning pieces as ``reasoning_content`` deltas; the answer's as content (or tool calls)."""
        chunks = []
        for kind, text in pieces:
            if kind == "reasoning":
                delta = Delta(reasoning_content=text, reasoning=text)
                chunks.append(
                    self._chunk(head, [ChunkChoice(index=choice.index, delta=delta, logprobs=self._logprobs(choice))])
                )
            else:
                chunks += self._answer_chunks(head, choice, text)
        return chunks

    def _answer_chunks(self, head: ResponseHead, choice: GeneratedChoice, delta: str) -> list[Any]:
        if choice.parser is None:
            chunk = ChunkChoice(index=choice.index, delta=Delta(content=delta), logprobs=self._logprobs(choice))
            return [self._chunk(head, [chunk])]
        return self._piece_chunks(head, choice, choice.parser.feed(delta))

    def _piece_chunks(self, head: ResponseHead, choice: GeneratedChoice, pieces: list[Piece]) -> list[Any]:
        """One chunk per piece of content or of a call (its id and name, then pieces of its arguments)."""
        chunks = []
        for piece in pieces:
            if isinstance(piece, Content):
                delta = Delta(content=piece.text)
            elif isinstance(piece, CallStart):
                call = ToolCallDelta(
                    index=piece.index,
                    id=piece.id,
                    type="function",
                    function=FunctionCallDelta(name=piece.name, arguments=""),
                )
                delta = Delta(tool_calls=[call])
            else:
                delta = Delta(
                    tool_calls=[ToolCallDelta(index=piece.index, function=FunctionCallDelta(arguments=piece.text))]
                )
            chunks.append(
                self._chunk(head, [ChunkChoice(index=choice.index, delta=delta, logprobs=self._logprobs(choice))])
            )
        return chunks

    def end_events(self, request: ChatCompletionRequest, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        chunks = self._reasoned_chunks(head, choice, choice.reasoner.finish()) if choice.reasoner is not None else []
        if choice.parser is not None:
            chunks += self._piece_chunks(head, choice, choice.parser.finish())
        finish = ChunkChoice(
            index=choice.index,
            delta=Delta(),
            finish_reason=self._finish_reason(choice),
            logprobs=self._logprobs(choice),
        )
        return [*chunks, self._chunk(head, [finish])]

    def close_events(
        self, request: ChatCompletionRequest, head: ResponseHead, choices: list[GeneratedChoice]
    ) -> list[Any]:
        return [self._chunk(head, [], usage_of(choices))] if include_usage(request) else []

"""``/v1/chat/completions``: the request and response mapping; ``proxy.serving`` does the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends import GenerationParams, Model, PreparedPrompt
from backends.model import TokenLogprob as BackendTokenLogprob
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
    TokenLogprob,
    TopLogprob,
    Usage,
)
from proxy.serving import SYSTEM_FINGERPRINT, GeneratedChoice, OpenAIServing, ResponseHead, generation_params, usage_of


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role and a plain string content."""
    converted = []
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
        converted.append({"role": role, "content": content or ""})
    return converted


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """A 400 for every field we cannot honour, rather than a response that silently ignores it."""
    unsupported = {
        "tools": bool(request.tools),
        "tool_choice": request.tool_choice not in (None, "none"),
        "functions": bool(request.functions),
        "function_call": request.function_call not in (None, "none"),
        "response_format": request.response_format not in (None, {"type": "text"}),
        "logit_bias": bool(request.logit_bias),
        "audio": request.audio is not None,
        "modalities": request.modalities not in (None, ["text"]),
        "prediction": request.prediction is not None,
    }
    for param, used in unsupported.items():
        if used:
            raise APIError(
                400,
                f"'{param}' is not supported by this server (clemproxy generates plain text only)",
                param=param,
                code="unsupported_parameter",
            )


def wire_logprobs(entries: list[BackendTokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.bytes),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, lp, b in entry.top],
            )
            for entry in entries
        ]
    )


Messages = list[dict[str, Any]]


class ChatCompletionService(OpenAIServing[ChatCompletionRequest, Messages, ChatCompletion]):
    id_prefix = "chatcmpl"

    def parameters(self, request: ChatCompletionRequest, spec: Mapping[str, Any]) -> tuple[GenerationParams, Messages]:
        refuse_unsupported(request)
        self.limits.check_messages(len(request.messages))
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
        )
        return params, message_dicts(request.messages)

    def prompts(self, model: Model, inputs: Messages, params: GenerationParams) -> list[PreparedPrompt]:
        return [model.prepare(inputs, params)]

    def response(
        self, request: ChatCompletionRequest, head: ResponseHead, choices: list[GeneratedChoice]
    ) -> ChatCompletion:
        return ChatCompletion(
            id=head.id,
            created=head.created,
            model=head.model,
            choices=[
                Choice(
                    index=choice.index,
                    message=ChatCompletionMessage(content=choice.text),
                    finish_reason=choice.outcome.finish_reason,
                    logprobs=wire_logprobs(choice.outcome.logprobs) if choice.params.logprobs else None,
                )
                for choice in choices
            ],
            usage=usage_of(choices),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

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
        return [self._chunk(head, [ChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""))])]

    def delta_event(
        self, request: ChatCompletionRequest, head: ResponseHead, choice: GeneratedChoice, delta: str
    ) -> Any:
        chunk = ChunkChoice(index=choice.index, delta=Delta(content=delta), logprobs=self._logprobs(choice))
        return self._chunk(head, [chunk])

    def end_event(self, request: ChatCompletionRequest, head: ResponseHead, choice: GeneratedChoice) -> Any:
        finish = ChunkChoice(
            index=choice.index,
            delta=Delta(),
            finish_reason=choice.outcome.finish_reason,
            logprobs=self._logprobs(choice),
        )
        return self._chunk(head, [finish])

    def usage_event(self, request: ChatCompletionRequest, head: ResponseHead, usage: Usage) -> Any:
        return self._chunk(head, [], usage)

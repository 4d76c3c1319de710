"""``/v1/completions``: OpenAI's legacy text completions, on a raw prompt without the chat template.

A list of prompts gives ``n`` choices per prompt, indexed prompt by prompt as OpenAI does. Only the request
and response mapping is here; queueing, cancellation, cleaning and usage are ``proxy.serving``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends import GenerationParams, Model, PreparedPrompt
from backends.model import TokenLogprob as BackendTokenLogprob
from proxy.errors import APIError
from proxy.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from proxy.serving import (
    SYSTEM_FINGERPRINT,
    GeneratedChoice,
    OpenAIServing,
    ResponseHead,
    generation_params,
    include_usage,
    usage_of,
)


def legacy_logprobs(entries: list[BackendTokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy shape: parallel lists, text offsets counted from the start of the returned text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{token: logprob for token, logprob, _ in e.top} for e in entries],
        text_offset=offsets,
    )


class CompletionService(OpenAIServing[CompletionRequest, list[str], Completion]):
    id_prefix = "cmpl-"

    def parameters(self, request: CompletionRequest, spec: Mapping[str, Any]) -> tuple[GenerationParams, list[str]]:
        for param, used in (
            ("best_of", request.best_of not in (None, 1)),
            ("suffix", bool(request.suffix)),
            ("logit_bias", bool(request.logit_bias)),
            ("echo", request.echo and request.logprobs is not None),  # would need the prompt's own logprobs
        ):
            if used:
                raise APIError(
                    400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter"
                )
        params = generation_params(
            request,
            spec,
            max_tokens=self.limits.completion_tokens(request.max_tokens, "max_tokens"),
            logprobs=request.logprobs is not None,
            top_logprobs=request.logprobs or 0,
        )
        return params, [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)

    def prompts(self, model: Model, inputs: list[str], params: GenerationParams) -> list[PreparedPrompt]:
        return [model.prepare_text(text, params) for text in inputs]

    @staticmethod
    def _echoed(request: CompletionRequest, choice: GeneratedChoice) -> str:
        return choice.prompt.text if request.echo else ""

    def response(self, request: CompletionRequest, head: ResponseHead, choices: list[GeneratedChoice]) -> Completion:
        completion = self._completion(head, [])
        for choice in choices:
            echoed = self._echoed(request, choice)
            logprobs = legacy_logprobs(choice.outcome.logprobs, len(echoed)) if choice.params.logprobs else None
            completion.choices.append(
                CompletionChoice(
                    index=choice.index,
                    text=echoed + choice.text,
                    finish_reason=choice.outcome.finish_reason,
                    logprobs=logprobs,
                )
            )
        completion.usage = usage_of(choices)
        return completion

    @staticmethod
    def _completion(head: ResponseHead, choices: list[CompletionChoice]) -> Completion:
        return Completion(
            id=head.id, created=head.created, model=head.model, choices=choices, system_fingerprint=SYSTEM_FINGERPRINT
        )

    def _logprobs(self, request: CompletionRequest, choice: GeneratedChoice) -> CompletionLogprobs | None:
        """The log probabilities not yet sent, with offsets after what the stream sent so far."""
        if not choice.params.logprobs:
            return None
        return legacy_logprobs(choice.fresh_logprobs(), len(self._echoed(request, choice)) + len(choice.text))

    def start_events(self, request: CompletionRequest, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        if not request.echo:
            return []
        return [
            self._completion(head, [CompletionChoice(index=choice.index, text=choice.prompt.text, finish_reason=None)])
        ]

    def delta_events(
        self, request: CompletionRequest, head: ResponseHead, choice: GeneratedChoice, delta: str
    ) -> list[Any]:
        text = CompletionChoice(
            index=choice.index, text=delta, finish_reason=None, logprobs=self._logprobs(request, choice)
        )
        return [self._completion(head, [text])]

    def end_events(self, request: CompletionRequest, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        finish = CompletionChoice(
            index=choice.index,
            text="",
            finish_reason=choice.outcome.finish_reason,
            logprobs=self._logprobs(request, choice),
        )
        return [self._completion(head, [finish])]

    def close_events(self, request: CompletionRequest, head: ResponseHead, choices: list[GeneratedChoice]) -> list[Any]:
        if not include_usage(request):
            return []
        completion = self._completion(head, [])
        completion.usage = usage_of(choices)
        return [completion]

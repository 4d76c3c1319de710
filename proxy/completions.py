"""``/v1/completions``: OpenAI's legacy text completions, on a raw prompt without the chat template.

A list of prompts gives ``n`` choices per prompt, indexed prompt by prompt as OpenAI does. Everything else
(queueing, cancellation, cleaning, usage) is what ``/v1/chat/completions`` does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from backends import GenerationOutcome, GenerationParams, PreparedPrompt
from backends.model import TokenLogprob as BackendTokenLogprob
from proxy.chat import (
    DONE_EVENT,
    SYSTEM_FINGERPRINT,
    choice_parameters,
    leased_generation,
    sse,
    stream_error,
    usage_of,
)
from proxy.errors import APIError
from proxy.limits import NO_LIMITS, RequestLimits
from proxy.manager import ModelManager
from proxy.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage


def completion_params(
    request: CompletionRequest, spec: Mapping[str, Any], limits: RequestLimits = NO_LIMITS
) -> GenerationParams:
    for param, used in (
        ("best_of", request.best_of not in (None, 1)),
        ("suffix", bool(request.suffix)),
        ("logit_bias", bool(request.logit_bias)),
        ("echo", request.echo and request.logprobs is not None),  # would need the prompt's own logprobs
    ):
        if used:
            raise APIError(400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter")
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    return GenerationParams(
        max_tokens=limits.completion_tokens(request.max_tokens, "max_tokens"),
        temperature=float(spec.get("temperature", 1.0)) if request.temperature is None else request.temperature,
        top_p=float(spec.get("top_p", 1.0)) if request.top_p is None else request.top_p,
        stop=tuple(stop),
        seed=request.seed,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs or 0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
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


class CompletionService:
    def __init__(self, manager: ModelManager, limits: RequestLimits = NO_LIMITS) -> None:
        self.manager = manager
        self.limits = limits

    async def prepare(self, request: CompletionRequest) -> tuple[list[PreparedPrompt], GenerationParams]:
        params = completion_params(request, self.manager.slot(request.model).spec, self.limits)
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        async with self.manager.holding(request.model) as model:
            prepared = [await asyncio.to_thread(model.prepare_text, text, params) for text in prompts]
        return prepared, params

    async def complete(self, request: CompletionRequest) -> Completion:
        prompts, params = await self.prepare(request)
        choices: list[CompletionChoice] = []
        outcomes: list[GenerationOutcome] = []
        async with self.manager.lease(request.model) as lease:
            for prompt in prompts:
                for choice_params in choice_parameters(params, request.n or 1):
                    outcome = GenerationOutcome()
                    generation = leased_generation(self.manager, request.model, lease, prompt, choice_params, outcome)
                    async with aclosing(generation) as deltas:
                        text = "".join([delta async for delta in deltas])
                    head = prompt.text if request.echo else ""
                    choices.append(
                        CompletionChoice(
                            index=len(choices),
                            text=head + text,
                            finish_reason=outcome.finish_reason,
                            logprobs=legacy_logprobs(outcome.logprobs, len(head)) if params.logprobs else None,
                        )
                    )
                    outcomes.append(outcome)
        if error := lease.error():
            raise error
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=usage_of_prompts(outcomes, request.n or 1),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[bytes]:
        prompts, params = await self.prepare(request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return self._events(request, prompts, params, include_usage)

    async def _events(
        self, request: CompletionRequest, prompts: list[PreparedPrompt], params: GenerationParams, include_usage: bool
    ) -> AsyncIterator[bytes]:
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def event(choices: list[CompletionChoice], outcomes: list[GenerationOutcome] | None = None) -> bytes:
            completion = Completion(
                id=completion_id,
                created=created,
                model=request.model,
                choices=choices,
                system_fingerprint=SYSTEM_FINGERPRINT,
            )
            if outcomes is not None:
                completion.usage = usage_of_prompts(outcomes, request.n or 1)
            return sse(completion)

        outcomes: list[GenerationOutcome] = []
        try:
            async with self.manager.lease(request.model) as lease:
                index = 0
                for prompt in prompts:
                    for choice_params in choice_parameters(params, request.n or 1):
                        outcome = GenerationOutcome()
                        outcomes.append(outcome)
                        sent, offset = 0, 0
                        if request.echo:
                            yield event([CompletionChoice(index=index, text=prompt.text, finish_reason=None)])
                            offset = len(prompt.text)
                        generation = leased_generation(
                            self.manager, request.model, lease, prompt, choice_params, outcome
                        )
                        async with aclosing(generation) as deltas:
                            async for delta in deltas:
                                fresh, sent = outcome.logprobs[sent:], len(outcome.logprobs)
                                logprobs = legacy_logprobs(fresh, offset) if params.logprobs else None
                                offset += len(delta)
                                choice = CompletionChoice(
                                    index=index, text=delta, finish_reason=None, logprobs=logprobs
                                )
                                yield event([choice])
                        if error := lease.error():
                            raise error
                        rest = legacy_logprobs(outcome.logprobs[sent:], offset) if params.logprobs else None
                        yield event(
                            [CompletionChoice(index=index, text="", finish_reason=outcome.finish_reason, logprobs=rest)]
                        )
                        index += 1
            if include_usage:
                yield event([], outcomes)
        except Exception as exc:
            yield stream_error(request.model, exc)
        yield DONE_EVENT


def usage_of_prompts(outcomes: list[GenerationOutcome], n: int) -> Usage:
    """Each prompt's tokens count once, however many choices it got."""
    usage = usage_of(outcomes)
    prompt_tokens = sum(outcome.prompt_tokens for outcome in outcomes[::n])
    usage.prompt_tokens = prompt_tokens
    usage.total_tokens = prompt_tokens + usage.completion_tokens
    return usage

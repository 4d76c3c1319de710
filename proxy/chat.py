"""``/v1/chat/completions``: from a request to a completion or an SSE stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from backends import BackendError, GenerationOutcome, GenerationParams, PreparedPrompt
from backends.model import TokenLogprob as BackendTokenLogprob
from proxy.errors import APIError
from proxy.generation import generate_text
from proxy.limits import NO_LIMITS, RequestLimits
from proxy.manager import Lease, ModelManager
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
    encode,
)

logger = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = "clemproxy"
DONE_EVENT = b"data: [DONE]\n\n"


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


def generation_params(
    request: ChatCompletionRequest, spec: Mapping[str, Any], limits: RequestLimits = NO_LIMITS
) -> GenerationParams:
    """Request settings; sampling settings the request leaves out come from the entry, then OpenAI's defaults."""
    refuse_unsupported(request)
    limits.check_messages(len(request.messages))
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    if request.max_completion_tokens is not None:
        max_tokens = limits.completion_tokens(request.max_completion_tokens, "max_completion_tokens")
    else:
        max_tokens = limits.completion_tokens(request.max_tokens, "max_tokens")
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=float(spec.get("temperature", 1.0)) if request.temperature is None else request.temperature,
        top_p=float(spec.get("top_p", 1.0)) if request.top_p is None else request.top_p,
        stop=tuple(stop),
        seed=request.seed,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        template_kwargs=dict(request.chat_template_kwargs or {}),
    )


def sse(event: Any) -> bytes:
    return b"data: " + encode(event) + b"\n\n"


class ChatCompletionService:
    def __init__(self, manager: ModelManager, limits: RequestLimits = NO_LIMITS) -> None:
        self.manager = manager
        self.limits = limits

    async def prepare(self, request: ChatCompletionRequest) -> tuple[PreparedPrompt, GenerationParams]:
        """Everything that can fail before the first byte: lookup, admission, load, template, context check."""
        # Request errors first: a bad request never makes the server load a model.
        params = generation_params(request, self.manager.slot(request.model).spec, self.limits)
        messages = message_dicts(request.messages)
        async with self.manager.holding(request.model) as model:
            prompt = await asyncio.to_thread(model.prepare, messages, params)
        return prompt, params

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletion:
        prompt, params = await self.prepare(request)
        outcomes: list[GenerationOutcome] = []
        contents: list[str] = []
        async with self.manager.lease(request.model) as lease:
            for choice_params in choice_parameters(params, request.n or 1):
                outcome = GenerationOutcome()
                outcomes.append(outcome)
                generation = leased_generation(self.manager, request.model, lease, prompt, choice_params, outcome)
                async with aclosing(generation) as deltas:
                    contents.append("".join([delta async for delta in deltas]))
        if error := lease.error():
            raise error
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            choices=[
                Choice(
                    index=i,
                    message=ChatCompletionMessage(content=content),
                    finish_reason=outcome.finish_reason,
                    logprobs=wire_logprobs(outcome.logprobs) if params.logprobs else None,
                )
                for i, (content, outcome) in enumerate(zip(contents, outcomes, strict=True))
            ],
            usage=usage_of(outcomes),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[bytes]:
        """Validate and prepare now (errors become HTTP errors), then return the SSE body."""
        prompt, params = await self.prepare(request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return self._events(request.model, prompt, params, request.n or 1, include_usage)

    async def _events(
        self, name: str, prompt: PreparedPrompt, params: GenerationParams, n: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        sent = 0  # logprob entries of the current choice already sent

        def chunk(
            index: int, delta: Delta, finish_reason: str | None = None, outcome: GenerationOutcome | None = None
        ) -> bytes:
            nonlocal sent
            logprobs = None
            if params.logprobs and outcome is not None:
                fresh, sent = outcome.logprobs[sent:], len(outcome.logprobs)
                logprobs = wire_logprobs(fresh)
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
            return sse(
                ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=name,
                    choices=[choice],
                    system_fingerprint=SYSTEM_FINGERPRINT,
                )
            )

        outcomes: list[GenerationOutcome] = []
        try:
            # Waiting in the model's queue happens here, after the headers: a client that leaves while queued
            # cancels this generator, which takes it out of the queue. With n > 1 the choices come one after
            # the other, each with its own index, role chunk and finish_reason.
            async with self.manager.lease(name) as lease:
                for index, choice_params in enumerate(choice_parameters(params, n)):
                    outcome = GenerationOutcome()
                    outcomes.append(outcome)
                    sent = 0
                    yield chunk(index, Delta(role="assistant", content=""))
                    generation = leased_generation(self.manager, name, lease, prompt, choice_params, outcome)
                    async with aclosing(generation) as deltas:
                        async for delta in deltas:
                            yield chunk(index, Delta(content=delta), outcome=outcome)
                    if error := lease.error():
                        raise error
                    yield chunk(index, Delta(), outcome.finish_reason, outcome)
            if include_usage:
                yield sse(
                    ChatCompletionChunk(
                        id=completion_id,
                        created=created,
                        model=name,
                        choices=[],
                        system_fingerprint=SYSTEM_FINGERPRINT,
                        usage=usage_of(outcomes),
                    )
                )
        except Exception as exc:
            yield stream_error(name, exc)
        yield DONE_EVENT


async def leased_generation(
    manager: ModelManager,
    model: str,
    lease: Lease,
    prompt: PreparedPrompt,
    params: GenerationParams,
    outcome: GenerationOutcome,
) -> AsyncGenerator[str, None]:
    """One generation under ``lease``, for both completion services: it stops when the lease is stopped,
    records its time to the first delta in the metrics, and counts its tokens on the lease, also for a
    client that left mid-stream."""
    started = time.monotonic()
    first = True
    try:
        async with aclosing(generate_text(lease.model, prompt, params, outcome, lease.cancel_event())) as deltas:
            async for delta in deltas:
                if first and manager.metrics is not None:
                    manager.metrics.first_token.labels(model).observe(time.monotonic() - started)
                first = False
                yield delta
    finally:
        lease.tokens += outcome.completion_tokens


def stream_error(name: str, exc: Exception) -> bytes:
    """The one SSE event that ends a stream which broke after it had started; ``[DONE]`` follows it.

    Called from an ``except`` block, so that an unforeseen error is logged with its traceback.
    """
    if isinstance(exc, APIError):
        logger.warning("%s: stream ended early: %s", name, exc.message)
        error = exc
    elif isinstance(exc, BackendError):
        logger.warning("%s: generation failed mid-stream: %s", name, exc.message)
        error = APIError.from_backend(exc)
    else:
        logger.exception("%s: generation failed mid-stream", name)
        error = APIError(500, f"Generation failed ({type(exc).__name__}); see the server log", code="internal_error")
    return sse(error.body())


def usage_of(outcomes: list[GenerationOutcome]) -> Usage:
    """The prompt counts once, however many choices were generated from it (as OpenAI counts)."""
    prompt_tokens = outcomes[0].prompt_tokens if outcomes else 0
    completion_tokens = sum(outcome.completion_tokens for outcome in outcomes)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
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


def choice_parameters(params: GenerationParams, n: int) -> list[GenerationParams]:
    """One parameter set per choice; with a seed, choice i samples with seed + i, so the choices differ but the
    whole response is reproducible."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + index) for index in range(n)]

"""The one serving path of ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` (vLLM's
``OpenAIServing``).

Validate the request (before anything loads), reserve the model, prepare the prompts on it, wait for the
turn, generate each choice, and answer with one body or an SSE stream that ends with the one trailer: an
error event if something broke, then ``data: [DONE]``. An endpoint supplies only its request and response
mapping (``chat``, ``completions``, ``responses``), and may reshape the stream's frame and trailer (the
Responses API numbers its typed events and ends without ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from backends import BackendError, GenerationOutcome, GenerationParams, Model, PreparedPrompt
from backends.model import TokenLogprob
from backends.registry.variants import request_entry, template_arguments
from proxy.errors import APIError
from proxy.generation import generate_text
from proxy.limits import NO_LIMITS, RequestLimits
from proxy.manager import Lease, ManagerError, ModelManager
from proxy.protocol import PromptTokensDetails, Usage, encode

logger = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = "clemproxy"
DONE_EVENT = b"data: [DONE]\n\n"


class SamplingRequest(Protocol):
    """The sampling fields the completion requests share (the Responses API lacks some: always None there)."""

    @property
    def temperature(self) -> float | None: ...

    @property
    def top_p(self) -> float | None: ...

    @property
    def stop(self) -> str | list[str] | None: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def presence_penalty(self) -> float | None: ...

    @property
    def frequency_penalty(self) -> float | None: ...


def generation_params(
    request: SamplingRequest,
    spec: Mapping[str, Any],
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    template_kwargs: Mapping[str, Any] | None = None,
    reasoning_effort: str | None = None,
    reasoning_budget: int | None = None,
) -> GenerationParams:
    """A request's settings as the backends take them. Temperature and top_p the request leaves out come from
    the registry entry, else ``GenerationParams``' own defaults (OpenAI's). The entry's per-request keys go
    along (its template, cleaning...), so that a variant sharing another entry's load prompts as its own; its
    ``chat_template_kwargs`` are defaults the request's own override."""
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    sampling: dict[str, Any] = {}
    for key in ("temperature", "top_p"):
        value = getattr(request, key)
        value = spec.get(key) if value is None else value
        if value is not None:
            sampling[key] = float(value)
    return GenerationParams(
        max_tokens=max_tokens,
        stop=tuple(stop),
        seed=request.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        template_kwargs=template_arguments(spec, template_kwargs, reasoning_effort),
        entry=request_entry(spec),
        reasoning_budget=reasoning_budget if reasoning_budget is not None else spec.get("reasoning_budget"),
        **sampling,
    )


def choice_parameters(params: GenerationParams, n: int) -> list[GenerationParams]:
    """One parameter set per choice; with a seed, choice i samples with seed + i, so the choices differ but the
    whole response is reproducible."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + index) for index in range(n)]


@dataclass
class GeneratedChoice:
    """One choice of a response: the prompt it continues, its settings, and what it generated so far."""

    index: int
    prompt: PreparedPrompt
    params: GenerationParams
    first_of_prompt: bool  # the prompt's tokens count once in the usage, however many choices it has
    outcome: GenerationOutcome = field(default_factory=GenerationOutcome)
    text: str = ""  # the cleaned text so far: all of it once generated
    logprobs_sent: int = 0
    parser: Any = None  # the endpoint's reader of a streamed text (``backends.text.tools.ToolCallParser``)
    reasoner: Any = None  # its reader of the reasoning before the answer (``backends.text.reasoning``)

    def fresh_logprobs(self) -> list[TokenLogprob]:
        """Log probabilities not yet sent in a stream chunk."""
        fresh = self.outcome.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.outcome.logprobs)
        return fresh


@dataclass(frozen=True)
class ResponseHead:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str


def usage_of(choices: list[GeneratedChoice]) -> Usage:
    """Each prompt counts once, however many choices were generated from it (as OpenAI counts)."""
    firsts = [c.outcome for c in choices if c.first_of_prompt]
    prompt_tokens = sum(outcome.prompt_tokens for outcome in firsts)
    completion_tokens = sum(c.outcome.completion_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(outcome.cached_tokens for outcome in firsts)),
    )


def sse(event: Any) -> bytes:
    return b"data: " + encode(event) + b"\n\n"


def stream_failure(name: str, exc: Exception) -> APIError:
    """What broke a stream after it had started, as the error its last event reports; logged here.

    Called from an ``except`` block, so that an unforeseen error is logged with its traceback.
    """
    if isinstance(exc, APIError):
        logger.warning("%s: stream ended early: %s", name, exc.message)
        return exc
    if isinstance(exc, ManagerError | BackendError):
        logger.warning("%s: stream ended early: %s", name, exc.message)
        return APIError.of(exc)
    logger.exception("%s: generation failed mid-stream", name)
    return APIError(500, f"Generation failed ({type(exc).__name__}); see the server log", code="internal_error")


def stream_error(name: str, exc: Exception) -> bytes:
    """The one SSE event that ends a stream which broke after it had started; ``[DONE]`` follows it."""
    return sse(stream_failure(name, exc).body())


def include_usage(request: Any) -> bool:
    """Whether a chat or legacy completion stream ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(request.stream_options and request.stream_options.include_usage)


RequestT = TypeVar("RequestT", bound="CompletionRequestLike")
InputT = TypeVar("InputT")
ResponseT = TypeVar("ResponseT")


class CompletionRequestLike(Protocol):
    """What the path itself reads of a request; the rest is the endpoint's."""

    @property
    def model(self) -> str: ...

    @property
    def n(self) -> int | None: ...

    @property
    def stream(self) -> bool: ...


class OpenAIServing(ABC, Generic[RequestT, InputT, ResponseT]):
    """The shared path; subclasses map one endpoint's request (to settings and prompt input) and response."""

    id_prefix: ClassVar[str]  # with its separator: "chatcmpl-", "resp_"
    done_event: ClassVar[bytes] = DONE_EVENT  # the stream's last frame, after its last event

    def __init__(self, manager: ModelManager, limits: RequestLimits = NO_LIMITS, metrics: Any = None) -> None:
        self.manager = manager
        self.limits = limits
        self.metrics = metrics  # proxy.metrics.Metrics, when the app keeps metrics

    # --- what an endpoint supplies -------------------------------------------------------------------

    @abstractmethod
    def parameters(self, request: RequestT, spec: Mapping[str, Any]) -> tuple[GenerationParams, InputT]:
        """Validate the request: its generation settings, and what its prompts are made from (messages, texts).
        Runs before any model is loaded."""

    @abstractmethod
    def prompts(self, model: Model, inputs: InputT, params: GenerationParams) -> list[PreparedPrompt]:
        """Render and tokenise the request's prompts (on a worker thread, the model held loaded)."""

    @abstractmethod
    def response(self, request: RequestT, head: ResponseHead, choices: list[GeneratedChoice]) -> ResponseT:
        """The whole answer."""

    @abstractmethod
    def start_events(self, request: RequestT, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        """Chunks that open a choice in a stream (the assistant role, an echoed prompt)."""

    @abstractmethod
    def delta_events(self, request: RequestT, head: ResponseHead, choice: GeneratedChoice, delta: str) -> list[Any]:
        """The chunks for one text delta (none while it is held back); ``choice.text`` is still the text before
        it."""

    @abstractmethod
    def end_events(self, request: RequestT, head: ResponseHead, choice: GeneratedChoice) -> list[Any]:
        """The chunks that end a choice: what was held back, then its finish reason."""

    @abstractmethod
    def close_events(self, request: RequestT, head: ResponseHead, choices: list[GeneratedChoice]) -> list[Any]:
        """The events after the last choice (the usage chunk, when ``stream_options.include_usage`` asks)."""

    def open_events(self, request: RequestT, head: ResponseHead) -> list[Any]:
        """The events before the first choice, once the turn has come."""
        return []

    def failure_events(
        self, request: RequestT, head: ResponseHead, choices: list[GeneratedChoice], error: APIError
    ) -> list[Any]:
        """The events that end a stream which broke: by default the error's envelope."""
        return [error.body()]

    def frame(self, event: Any, sequence: int) -> bytes:
        """One event as SSE; ``sequence`` counts the stream's events from 0."""
        return sse(event)

    async def finished(self, request: RequestT, head: ResponseHead, choices: list[GeneratedChoice]) -> None:
        """Every choice has been generated, without error; runs before the whole answer or the closing events
        are made (the Responses API stores its response here)."""

    # --- the path ------------------------------------------------------------------------------------

    def _head(self, request: RequestT) -> ResponseHead:
        return ResponseHead(f"{self.id_prefix}{uuid.uuid4().hex}", int(time.time()), request.model)

    def _validated(self, request: RequestT) -> tuple[GenerationParams, InputT]:
        # Request errors first: a bad request never makes the server load a model.
        return self.parameters(request, self.manager.entry_spec(request.model))

    async def _choices(
        self, model: Model, request: RequestT, params: GenerationParams, inputs: InputT
    ) -> list[GeneratedChoice]:
        prompts = await asyncio.to_thread(self.prompts, model, inputs, params)
        choices: list[GeneratedChoice] = []
        for prompt in prompts:
            for index, choice_params in enumerate(choice_parameters(params, request.n or 1)):
                choices.append(GeneratedChoice(len(choices), prompt, choice_params, first_of_prompt=index == 0))
        return choices

    async def complete(self, request: RequestT) -> ResponseT:
        params, inputs = self._validated(request)
        head = self._head(request)
        async with self.manager.reserve(request.model) as reservation:
            assert reservation.model is not None
            choices = await self._choices(reservation.model, request, params, inputs)
            lease = await reservation.turn()
            for choice in choices:
                async with aclosing(self._generate(request.model, lease, choice)) as deltas:
                    choice.text = "".join([delta async for delta in deltas])
        if error := lease.error():
            raise error
        await self.finished(request, head, choices)
        return self.response(request, head, choices)

    async def stream(self, request: RequestT) -> AsyncIterator[bytes]:
        """Validate, reserve and prepare now, so that refusals and bad prompts are HTTP errors before the
        response starts; then return the SSE body, which waits for the turn and generates."""
        params, inputs = self._validated(request)
        events = self._events(request, params, inputs)
        await anext(events)  # runs up to the first yield; a started generator is closed even if never read again
        return events

    async def _events(self, request: RequestT, params: GenerationParams, inputs: InputT) -> AsyncGenerator[bytes, None]:
        head = self._head(request)
        sequence = itertools.count()
        async with self.manager.reserve(request.model) as reservation:
            assert reservation.model is not None
            choices = await self._choices(reservation.model, request, params, inputs)
            yield b""  # ready: ``stream`` takes this one, the client never sees it
            try:
                # Waiting for the turn happens after the headers: a client that leaves while queued closes this
                # generator, which takes it out of the queue. With n > 1 the choices come one after the other.
                lease = await reservation.turn()
                for event in self.open_events(request, head):
                    yield self.frame(event, next(sequence))
                for choice in choices:
                    for event in self.start_events(request, head, choice):
                        yield self.frame(event, next(sequence))
                    async with aclosing(self._generate(request.model, lease, choice)) as deltas:
                        async for delta in deltas:
                            for event in self.delta_events(request, head, choice, delta):
                                yield self.frame(event, next(sequence))
                            choice.text += delta
                    if error := lease.error():
                        raise error
                    for event in self.end_events(request, head, choice):
                        yield self.frame(event, next(sequence))
                await self.finished(request, head, choices)
                for event in self.close_events(request, head, choices):
                    yield self.frame(event, next(sequence))
            except Exception as exc:
                failure = stream_failure(request.model, exc)
                for event in self.failure_events(request, head, choices, failure):
                    yield self.frame(event, next(sequence))
        if self.done_event:
            yield self.done_event

    async def _generate(self, name: str, lease: Lease, choice: GeneratedChoice) -> AsyncGenerator[str, None]:
        """One choice's generation under the lease: it stops when the lease is stopped, records its time to
        the first delta, and counts its tokens on the lease, also for a client that left mid-stream."""
        started = time.monotonic()
        first = True
        outcome = choice.outcome
        try:
            generation = generate_text(lease.model, choice.prompt, choice.params, outcome, lease.cancel_event())
            async with aclosing(generation) as deltas:
                async for delta in deltas:
                    if first:
                        lease.first_token = lease.first_token or time.monotonic() - started
                        if self.metrics is not None:
                            self.metrics.first_token.labels(name).observe(time.monotonic() - started)
                    first = False
                    yield delta
        finally:
            lease.tokens += outcome.completion_tokens

"""HTTP routes: thin handlers over the completion services and the registry, which they get as dependencies."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from backends import ModelRegistry, RegistryEntry
from backends.registry.keys import DESCRIPTIVE_KEYS
from proxy.chat import ChatCompletionService
from proxy.completions import CompletionService
from proxy.errors import APIError, from_decode_error
from proxy.manager import ModelManager
from proxy.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    HealthStatus,
    ModelCard,
    ModelList,
)
from proxy.security import Access, requires
from proxy.serving import OpenAIServing, RequestT, ResponseT
from proxy.upstream import Forwarder

T = TypeVar("T")
R = TypeVar("R")

# The content-type header is set directly: Litestar prefers the handler's JSON media type over the Stream's.
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}


def decode_body(body: bytes, kind: type[R]) -> R:
    """Decoded here rather than by Litestar so that every shape error names its field in OpenAI's envelope."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None


async def cancel_on_disconnect(request: Request[Any, Any, Any], work: Coroutine[Any, Any, T]) -> T:
    """Run a non-streamed request, cancelling it when the client disconnects (while queued or generating).

    Litestar watches for a disconnect only while it streams; before that, nobody would notice.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not watcher.done():
            raise  # we are being cancelled ourselves
        raise APIError(400, "The client closed the connection", code="client_disconnected") from None
    finally:
        watcher.cancel()


async def forward(
    request: Request[Any, Any, Any], forwarder: Forwarder, path: str, name: str, stream: bool, body: bytes
) -> Response[bytes] | Stream:
    """A request for an ``openai_compatible`` entry: its body goes upstream as the client sent it."""
    fields = msgspec.json.decode(body)  # an object: it has just been decoded into the endpoint's request
    if stream:
        return Stream(await cancel_on_disconnect(request, forwarder.stream(path, name, fields)), headers=SSE_HEADERS)
    return await cancel_on_disconnect(request, forwarder.complete(path, name, fields))


async def answer(
    request: Request[Any, Any, Any],
    kind: type[RequestT],
    service: OpenAIServing[RequestT, Any, ResponseT],
    forwarder: Forwarder,
    path: str,
) -> ResponseT | Response[bytes] | Stream:
    """One completion endpoint: decode the body; forward it for a remote entry, else serve it here, whole or
    streamed."""
    body = await request.body()
    completion_request = decode_body(body, kind)
    request.state.model = completion_request.model  # for the metrics
    if forwarder.forwards(completion_request.model):
        return await forward(request, forwarder, path, completion_request.model, bool(completion_request.stream), body)
    if completion_request.stream:
        return Stream(await service.stream(completion_request), headers=SSE_HEADERS)
    return await cancel_on_disconnect(request, service.complete(completion_request))


def model_card(entry: RegistryEntry, created: int) -> ModelCard:
    """An entry as ``/v1/models`` lists it, with the descriptive keys it has (release date, licence...)."""
    about = {key: entry.spec[key] for key in DESCRIPTIVE_KEYS if entry.spec.get(key) not in (None, "")}
    return ModelCard(id=entry.name, created=created, owned_by="clemproxy", **about)


class OpenAIController(Controller):
    path = "/v1"
    opt = requires(Access.API)

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        chat_service: NamedDependency[ChatCompletionService],
        forwarder: NamedDependency[Forwarder],
    ) -> ChatCompletion | Response[bytes] | Stream:
        return await answer(request, ChatCompletionRequest, chat_service, forwarder, "chat/completions")

    @post("/completions", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        completion_service: NamedDependency[CompletionService],
        forwarder: NamedDependency[Forwarder],
    ) -> Completion | Response[bytes] | Stream:
        return await answer(request, CompletionRequest, completion_service, forwarder, "completions")

    @get("/models")
    async def list_models(
        self, registry: NamedDependency[ModelRegistry], started_at: NamedDependency[float]
    ) -> ModelList:
        return ModelList(data=[model_card(entry, int(started_at)) for entry in registry.served()])

    @get("/models/{model_id:path}")
    async def retrieve_model(
        self, registry: NamedDependency[ModelRegistry], started_at: NamedDependency[float], model_id: FromPath[str]
    ) -> ModelCard:
        name = model_id.lstrip("/")
        served = next((entry for entry in registry.served() if entry.name == name), None)
        if served is None:
            registry.lookup(name)  # 404 model_not_found for unknown names
            raise APIError(
                404,
                f"The model '{name}' is in the registry but cannot be served here (invalid entry or "
                "unsupported backend)",
                param="model",
                code="model_not_found",
            )
        return model_card(served, int(started_at))


class HealthController(Controller):
    path = "/health"
    opt = requires(Access.OPEN, any_host=True)  # container probes reach it by address, and it tells little

    @get("/")
    async def health(
        self, registry: NamedDependency[ModelRegistry], manager: NamedDependency[ModelManager]
    ) -> HealthStatus:
        loaded = manager.loaded_names()
        return HealthStatus(status="ok", models_in_registry=len(registry), models_loaded=len(loaded), loaded=loaded)

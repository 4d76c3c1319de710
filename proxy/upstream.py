"""Forwarding ``openai_compatible`` entries to their upstream servers (``backends.openai_compatible``).

A forwarded request takes the same way through the model manager as a local one (admission, the queue bound,
its turn, its metrics), then its body goes upstream as the client sent it, with ``model`` set to the entry's
``model_id``; the answer comes back in the upstream's shape, with ``model`` set to the registry's name. One
pooled HTTP client per upstream server. An upstream that cannot be reached is a 502, one that stays silent a
504, both naming the server; an upstream's own error is passed on with its status; a stream the upstream
breaks ends with the usual error event and ``[DONE]``. A client that leaves closes the upstream connection,
which is how every OpenAI-compatible server learns to stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from litestar import MediaType, Request, Response

from backends import BACKENDS, ModelLoadError, ModelRegistry, RegistryEntry
from backends.openai_compatible import OpenAICompatibleModel, Upstream, resolve_upstream
from proxy.errors import APIError
from proxy.manager import Lease, ModelManager
from proxy.serving import DONE_EVENT, stream_error
from proxy.settings import ClusterSettings

logger = logging.getLogger(__name__)


class UpstreamErrorResponse(APIError):
    """An upstream's own error answer, passed on as it came: its status and its body."""

    def __init__(self, upstream: Upstream, status: int, content: bytes) -> None:
        detail: Any = None
        with contextlib.suppress(msgspec.DecodeError, AttributeError):
            detail = msgspec.json.decode(content).get("error")
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            super().__init__(status, detail["message"], param=detail.get("param"), code=detail.get("code"))
            self.content = content
        else:  # not OpenAI's envelope (a proxy's HTML page, say): wrapped in it, so every client can read it
            text = content.decode("utf-8", errors="replace").strip()[:500]
            super().__init__(status, f"The upstream server {upstream.base_url} answered {status}: {text}")
            self.content = msgspec.json.encode(self.body())


def handle_upstream_error(_: Request[Any, Any, Any], exc: UpstreamErrorResponse) -> Response[Any]:
    return Response(content=exc.content, status_code=exc.status, media_type=MediaType.JSON)


def unreachable(upstream: Upstream, exc: httpx.HTTPError) -> APIError:
    """502 for a server that cannot be reached or broke the connection, 504 for one that stayed silent."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APIError(
            504,
            f"The upstream server {upstream.base_url} did not answer in time ({type(exc).__name__}: {detail})",
            code="upstream_timeout",
        )
    return APIError(
        502,
        f"The upstream server {upstream.base_url} could not be reached ({type(exc).__name__}: {detail})",
        code="upstream_unreachable",
    )


@dataclass
class Reachability:
    """The last look at an upstream (``GET /models``), for the admin page."""

    reachable: bool
    checked_at: float
    latency_ms: float | None = None
    status: int | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "checked_at": self.checked_at,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "error": self.error,
        }


class UpstreamClients:
    """One pooled HTTP client per upstream server (scheme, host and port), for the life of the server."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._checks: dict[tuple[str, str], Reachability] = {}

    def client(self, upstream: Upstream) -> httpx.AsyncClient:
        origin = httpx.URL(upstream.base_url).copy_with(path="/", query=None).__str__()
        client = self._clients.get(origin)
        if client is None:
            timeout = httpx.Timeout(self.settings.upstream_read_timeout, connect=self.settings.upstream_connect_timeout)
            # No limit on connections here: the manager's queue bounds what is forwarded at once.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            client = self._clients[origin] = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def last_check(self, upstream: Upstream) -> Reachability | None:
        return self._checks.get((upstream.base_url, upstream.api_key))

    async def check(self, upstream: Upstream) -> Reachability:
        """Whether the upstream answers ``GET /models``; the answer is kept for ``upstream_check_interval``."""
        key = (upstream.base_url, upstream.api_key)
        last = self._checks.get(key)
        if last is not None and time.time() - last.checked_at < self.settings.upstream_check_interval:
            return last
        started = time.monotonic()
        try:
            response = await self.client(upstream).get(
                upstream.url("models"),
                headers=upstream.headers(),
                timeout=min(2.0, self.settings.upstream_read_timeout),
            )
        except httpx.HTTPError as exc:
            found = Reachability(False, time.time(), error=unreachable(upstream, exc).message)
        else:
            latency = round((time.monotonic() - started) * 1000, 1)
            error = None if response.is_success else f"GET /models answered {response.status_code}"
            found = Reachability(response.is_success, time.time(), latency, response.status_code, error)
        self._checks[key] = found
        return found


def is_remote(entry: RegistryEntry) -> bool:
    return entry.is_served and BACKENDS[str(entry.backend)].remote


async def check_registry(registry: ModelRegistry, clients: UpstreamClients) -> None:
    """Look again at every remote entry's upstream whose last look is stale, all at once (2 s at most)."""
    upstreams = {}
    for entry in registry.served():
        if is_remote(entry):
            try:
                upstream = resolve_upstream(entry.spec)
            except ModelLoadError:
                continue
            upstreams[(upstream.base_url, upstream.api_key)] = upstream
    await asyncio.gather(*(clients.check(upstream) for upstream in upstreams.values()))


def remote_view(entry: RegistryEntry, clients: UpstreamClients) -> dict[str, Any] | None:
    """Where a remote entry's requests go and whether that server answered its last look; None for local entries."""
    if not is_remote(entry):
        return None
    try:
        upstream = resolve_upstream(entry.spec)
    except ModelLoadError as exc:
        return {"base_url": None, "model_id": None, "configured_in": None, "reachable": False, "error": exc.message}
    check = clients.last_check(upstream)
    view: dict[str, Any] = {
        "base_url": upstream.base_url,
        "model_id": upstream.model_id,
        "configured_in": upstream.origin,
    }
    view.update(check.view() if check else {"reachable": None, "checked_at": None, "error": None})
    return view


def forwarded_body(spec: Mapping[str, Any], body: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """The body sent upstream: the entry's ``extra_body`` (clemcore merges it into every request it sends),
    then the request's own keys, which win (an object in both is merged key by key); ``model`` is the
    upstream's name."""
    extra = spec.get("extra_body")
    payload = dict(extra) if isinstance(extra, Mapping) else {}
    for key, value in body.items():
        mine = payload.get(key)
        payload[key] = {**mine, **value} if isinstance(mine, Mapping) and isinstance(value, Mapping) else value
    payload["model"] = model_id
    return payload


def usage_tokens(event: Mapping[str, Any]) -> int | None:
    usage = event.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


def generated_pieces(event: Mapping[str, Any]) -> int:
    """Chunks of text or calls in one streamed event: about one token each, for a stream that reports no usage."""
    pieces = 0
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if "delta" in choice else choice
        if isinstance(delta, dict) and (delta.get("content") or delta.get("text") or delta.get("tool_calls")):
            pieces += 1
    return pieces


class Forwarder:
    """Forwards one endpoint's requests for remote entries, under the manager's admission and queue."""

    def __init__(self, manager: ModelManager, clients: UpstreamClients, metrics: Any = None) -> None:
        self.manager = manager
        self.clients = clients
        self.metrics = metrics

    def forwards(self, name: str) -> bool:
        """Whether requests for this registry name go upstream (``UnknownModelError`` for an unknown one)."""
        return self.manager.slot(name).remote

    @staticmethod
    def _upstream(lease: Lease) -> Upstream:
        model = lease.model
        assert isinstance(model, OpenAICompatibleModel) and model.upstream is not None
        return model.upstream

    async def _stopped_with_lease(self, lease: Lease) -> None:
        """Returns once the lease is stopped (the request timeout, an unload that could not wait)."""
        stopped = asyncio.Event()
        lease.on_stop(stopped.set)
        await stopped.wait()

    async def complete(self, path: str, name: str, body: Mapping[str, Any]) -> Response[bytes]:
        async with self.manager.reserve(name) as reservation:
            lease = await reservation.turn()
            upstream = self._upstream(lease)
            payload = forwarded_body(self.manager.entry_spec(name), body, upstream.model_id)
            post = self.clients.client(upstream).post(upstream.url(path), json=payload, headers=upstream.headers())
            response = await self._unless_stopped(lease, post)
            if not response.is_success:
                raise UpstreamErrorResponse(upstream, response.status_code, response.content)
            try:
                answer = msgspec.json.decode(response.content)
            except msgspec.DecodeError:
                raise APIError(
                    502,
                    f"The upstream server {upstream.base_url} answered with something that is not JSON",
                    code="upstream_invalid_response",
                ) from None
            if isinstance(answer, dict):
                answer["model"] = name
                lease.tokens += usage_tokens(answer) or 0
        return Response(content=msgspec.json.encode(answer), media_type=MediaType.JSON)

    async def _unless_stopped(self, lease: Lease, work: Any) -> httpx.Response:
        """Await an upstream call, unless the lease is stopped first; unreachable upstreams become 502/504."""
        upstream = self._upstream(lease)
        task: asyncio.Future[httpx.Response] = asyncio.ensure_future(work)
        watcher: asyncio.Future[Any] = asyncio.ensure_future(self._stopped_with_lease(lease))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task not in done:
            error = lease.error()
            assert error is not None
            raise error
        try:
            return task.result()
        except httpx.HTTPError as exc:
            raise unreachable(upstream, exc) from None

    async def stream(self, path: str, name: str, body: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """Reserve, take the turn and open the upstream stream now, so that a refusal or an upstream's error is
        an HTTP error with its status; then return the SSE body, which relays the upstream's events."""
        events = self._events(path, name, body)
        await anext(events)
        return events

    async def _events(self, path: str, name: str, body: Mapping[str, Any]) -> AsyncGenerator[bytes, None]:
        async with self.manager.reserve(name) as reservation:
            lease = await reservation.turn()
            upstream = self._upstream(lease)
            client = self.clients.client(upstream)
            payload = forwarded_body(self.manager.entry_spec(name), body, upstream.model_id)
            request = client.build_request("POST", upstream.url(path), json=payload, headers=upstream.headers())
            response = await self._unless_stopped(lease, client.send(request, stream=True))
            try:
                if not response.is_success:
                    await response.aread()
                    raise UpstreamErrorResponse(upstream, response.status_code, response.content)
                yield b""  # ready: ``stream`` takes this one, the client never sees it
                async for event in self._relay(name, upstream, lease, response):
                    yield event
            finally:
                await response.aclose()  # mid-stream, this closes the connection: the upstream stops generating
        yield DONE_EVENT

    async def _relay(
        self, name: str, upstream: Upstream, lease: Lease, response: httpx.Response
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's events with the registry's model name; an error event if the stream breaks."""
        started = time.monotonic()
        pieces = 0
        reported: int | None = None
        finished = False
        stopped = asyncio.ensure_future(self._stopped_with_lease(lease))
        lines = response.aiter_lines()
        line_task: asyncio.Future[str] | None = None
        try:
            while True:
                line_task = asyncio.ensure_future(anext(lines))
                await asyncio.wait([line_task, stopped], return_when=asyncio.FIRST_COMPLETED)
                if not line_task.done():
                    line_task.cancel()
                    error = lease.error()
                    assert error is not None
                    raise error
                try:
                    line = line_task.result()
                except StopAsyncIteration:
                    break
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names: OpenAI's streams carry only data lines
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                try:
                    event = msgspec.json.decode(data)
                except msgspec.DecodeError:
                    raise APIError(
                        502,
                        f"The upstream server {upstream.base_url} sent an event that is not JSON: {data[:200]}",
                        code="upstream_invalid_response",
                    ) from None
                if isinstance(event, dict):
                    if "model" in event:
                        event["model"] = name
                    fresh = generated_pieces(event)
                    if fresh and not pieces:
                        lease.first_token = time.monotonic() - started
                        if self.metrics is not None:
                            self.metrics.first_token.labels(name).observe(lease.first_token)
                    pieces += fresh
                    reported = usage_tokens(event) or reported
                    if "error" in event:
                        finished = True  # the upstream's own error event ends its stream; it is passed on
                yield b"data: " + msgspec.json.encode(event) + b"\n\n"
                if finished:
                    break
            if not finished:
                raise APIError(
                    502,
                    f"The upstream server {upstream.base_url} ended the stream before [DONE]",
                    code="upstream_stream_broken",
                )
        except httpx.HTTPError as exc:
            yield stream_error(name, unreachable(upstream, exc))
        except Exception as exc:
            yield stream_error(name, exc)
        finally:
            stopped.cancel()
            if line_task is not None and not line_task.done():
                line_task.cancel()  # the client left while the upstream was quiet
            lease.tokens += reported if reported is not None else pieces

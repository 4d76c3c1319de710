"""``/v1/responses``: create a response (whole or streamed), and read back, list the input of, or delete a
stored one. Every stored response is found only with the API key that created it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream

from proxy.errors import APIError
from proxy.responses.protocol import CreateResponse, DeletedResponse, ItemList, Response
from proxy.responses.serving import ResponsesService
from proxy.responses.store import ResponseStore, StoredResponse
from proxy.routes import SSE_HEADERS, cancel_on_disconnect, decode_body
from proxy.security import Access, AccessControl, bearer_token, requires
from proxy.upstream import Forwarder


def owner_of(request: Request[Any, Any, Any], access: AccessControl) -> str:
    return access.owner_of(bearer_token(request))


def not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"No stored response '{response_id}' (it was never stored, was deleted or expired, or belongs to another "
        "API key)",
        param="response_id",
        code="response_not_found",
    )


async def stored(store: ResponseStore, response_id: str, owner: str) -> StoredResponse:
    found = await asyncio.to_thread(store.get, response_id, owner)
    if found is None:
        raise not_found(response_id)
    return found


class ResponsesController(Controller):
    path = "/v1/responses"
    opt = requires(Access.API)

    @post("/", status_code=200)
    async def create(
        self,
        request: Request[Any, Any, Any],
        responses_service: NamedDependency[ResponsesService],
        forwarder: NamedDependency[Forwarder],
        access: NamedDependency[AccessControl],
    ) -> Response | Stream:
        create = decode_body(await request.body(), CreateResponse)
        request.state.model = create.model  # for the metrics
        if forwarder.forwards(create.model):
            raise APIError(
                400,
                f"'{create.model}' is served by an upstream server (openai_compatible), and the Responses API is "
                "answered for models served here only; send it to /v1/chat/completions",
                param="model",
                code="unsupported_model",
            )
        call = await responses_service.call(create, owner_of(request, access))
        if create.stream:
            return Stream(await responses_service.stream(call), headers=SSE_HEADERS)
        return await cancel_on_disconnect(request, responses_service.complete(call))

    @get("/{response_id:str}")
    async def retrieve(
        self,
        request: Request[Any, Any, Any],
        response_store: NamedDependency[ResponseStore],
        access: NamedDependency[AccessControl],
        response_id: FromPath[str],
    ) -> dict[str, Any]:
        return (await stored(response_store, response_id, owner_of(request, access))).response

    @get("/{response_id:str}/input_items")
    async def input_items(
        self,
        request: Request[Any, Any, Any],
        response_store: NamedDependency[ResponseStore],
        access: NamedDependency[AccessControl],
        response_id: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        order: FromQuery[Literal["asc", "desc"]] = "desc",
        after: FromQuery[str | None] = None,
    ) -> ItemList:
        items = (await stored(response_store, response_id, owner_of(request, access))).input_items
        if order == "desc":
            items = items[::-1]
        if after is not None:
            at = next((index for index, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise APIError(400, f"No input item '{after}' in this response", param="after", code="invalid_value")
            items = items[at + 1 :]
        page = items[:limit]
        return ItemList(
            data=page,
            first_id=page[0]["id"] if page else "",
            last_id=page[-1]["id"] if page else "",
            has_more=len(items) > limit,
        )

    @delete("/{response_id:str}", status_code=200)
    async def delete(
        self,
        request: Request[Any, Any, Any],
        response_store: NamedDependency[ResponseStore],
        access: NamedDependency[AccessControl],
        response_id: FromPath[str],
    ) -> DeletedResponse:
        if not await asyncio.to_thread(response_store.delete, response_id, owner_of(request, access)):
            raise not_found(response_id)
        return DeletedResponse(id=response_id)

    @post("/compact", status_code=200)
    async def compact(self) -> None:
        """The Open Responses specification's compaction endpoint, which a server may leave out with a 404."""
        raise APIError(
            404,
            "Compaction (POST /v1/responses/compact) is not implemented by this server; send the whole input, or "
            "continue with previous_response_id",
            code="not_found",
        )
